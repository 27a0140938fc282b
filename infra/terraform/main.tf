# Object storage for chip stores, checkpoints and embedding layers, and a GPU node pool for
# embedding and pretraining, on AWS (S3 + an EKS managed node group added to an existing
# cluster). `terraform init && terraform apply -var cluster_name=... -var bucket_name=...`.

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

provider "aws" {
  region = var.region
}

resource "aws_s3_bucket" "anysat" {
  bucket = var.bucket_name
  tags   = var.tags
}

# checkpoints and plans are overwritten in place: keep earlier versions for a while
resource "aws_s3_bucket_versioning" "anysat" {
  bucket = aws_s3_bucket.anysat.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "anysat" {
  bucket = aws_s3_bucket.anysat.id
  rule {
    id     = "expire-old-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 2
    }
  }
}

resource "aws_s3_bucket_public_access_block" "anysat" {
  bucket                  = aws_s3_bucket.anysat.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "anysat" {
  bucket = aws_s3_bucket.anysat.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

# --- the GPU node pool ------------------------------------------------------------------

data "aws_eks_cluster" "this" {
  name = var.cluster_name
}

resource "aws_iam_role" "gpu_nodes" {
  name = "${var.cluster_name}-anysat-gpu-nodes"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
  tags = var.tags
}

resource "aws_iam_role_policy_attachment" "gpu_nodes" {
  for_each = toset([
    "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
    "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
    "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryReadOnly",
  ])
  role       = aws_iam_role.gpu_nodes.name
  policy_arn = each.value
}

resource "aws_eks_node_group" "gpu" {
  cluster_name    = data.aws_eks_cluster.this.name
  node_group_name = "anysat-gpu"
  node_role_arn   = aws_iam_role.gpu_nodes.arn
  subnet_ids      = var.subnet_ids
  ami_type        = "AL2_x86_64_GPU" # NVIDIA driver installed; the device plugin schedules GPUs
  instance_types  = var.gpu_instance_types
  capacity_type   = var.gpu_capacity_type
  disk_size       = 200

  scaling_config {
    min_size     = 0 # no GPU bill while nothing runs
    desired_size = 0
    max_size     = var.gpu_max_nodes
  }

  # what infra/kubernetes/work-pool-gpu.json and torchrun-job.yaml select and tolerate
  labels = {
    "anysat.io/pool" = "gpu"
  }
  taint {
    key    = "nvidia.com/gpu"
    value  = "present"
    effect = "NO_SCHEDULE"
  }

  tags       = var.tags
  depends_on = [aws_iam_role_policy_attachment.gpu_nodes]

  lifecycle {
    ignore_changes = [scaling_config[0].desired_size] # the autoscaler owns it
  }
}
