output "store_url" {
  description = "The store, for the CLI: tidemark list --store <store_url>."
  value       = local.store_url
}

output "bucket_name" {
  description = "The bucket holding the backups (created here or given)."
  value       = local.bucket
}

output "state_machine_arn" {
  description = "Start a backup by hand: aws stepfunctions start-execution --state-machine-arn <arn> --input '{\"mode\":\"full\"}'."
  value       = aws_sfn_state_machine.backup.arn
}

output "function_names" {
  description = "The four functions, by role (export, manifest, verify, prune)."
  value       = { for k, f in aws_lambda_function.function : k => f.function_name }
}

output "alarm_topic_arn" {
  description = "SNS topic every alarm notifies."
  value       = aws_sns_topic.alarms.arn
}

output "log_groups" {
  description = "Log groups of the functions and of the state machine."
  value = merge(
    { for k, g in aws_cloudwatch_log_group.function : k => g.name },
    { state-machine = aws_cloudwatch_log_group.states.name },
  )
}
