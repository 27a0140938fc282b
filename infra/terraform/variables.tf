variable "region" {
  type    = string
  default = "eu-central-1"
}

variable "bucket_name" {
  type        = string
  description = "the bucket for chip stores, checkpoints and embedding layers"
}

variable "noncurrent_version_days" {
  type    = number
  default = 30
}

variable "cluster_name" {
  type        = string
  description = "the existing EKS cluster the GPU node group joins"
}

variable "subnet_ids" {
  type        = list(string)
  description = "private subnets of the cluster for the GPU nodes"
}

variable "gpu_instance_types" {
  type    = list(string)
  default = ["g5.2xlarge"]
}

variable "gpu_capacity_type" {
  type        = string
  default     = "ON_DEMAND"
  description = "ON_DEMAND, or SPOT: runs resume from their checkpoints and tile markers"
}

variable "gpu_max_nodes" {
  type    = number
  default = 4
}

variable "tags" {
  type    = map(string)
  default = { project = "anysat" }
}
