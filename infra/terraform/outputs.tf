output "bucket" {
  value       = aws_s3_bucket.anysat.bucket
  description = "use as s3://<bucket>/... for --output, --store and checkpoints"
}

output "gpu_node_group" {
  value = aws_eks_node_group.gpu.node_group_name
}
