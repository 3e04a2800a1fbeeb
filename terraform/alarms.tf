# --------------------------------------------------------------------------- alarms

resource "aws_sns_topic" "alarms" {
  name              = "${local.name}-alarms"
  kms_master_key_id = "alias/aws/sns"
  tags              = var.tags
}

data "aws_iam_policy_document" "alarms_topic" {
  statement {
    sid       = "CloudWatchAlarmsPublish"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alarms.arn]

    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_sns_topic_policy" "alarms" {
  arn    = aws_sns_topic.alarms.arn
  policy = data.aws_iam_policy_document.alarms_topic.json
}

resource "aws_sns_topic_subscription" "email" {
  count     = var.alarm_email == null ? 0 : 1
  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = var.alarm_email
}

locals {
  state_machine_alarms = {
    execution-failed    = { metric = "ExecutionsFailed", description = "A backup execution failed. The execution history and state/last-failure.json in the store name the step and the error." }
    execution-timed-out = { metric = "ExecutionsTimedOut", description = "A backup execution ran past its 24-hour limit." }
  }
}

resource "aws_cloudwatch_metric_alarm" "state_machine" {
  for_each            = local.state_machine_alarms
  alarm_name          = "${local.name}-${each.key}"
  alarm_description   = each.value.description
  namespace           = "AWS/States"
  metric_name         = each.value.metric
  dimensions          = { StateMachineArn = aws_sfn_state_machine.backup.arn }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  threshold           = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  tags                = var.tags
}

resource "aws_cloudwatch_metric_alarm" "function_errors" {
  alarm_name          = "${local.name}-function-errors"
  alarm_description   = "A Tidemark function returned errors (retried ones included); see the function's log group."
  evaluation_periods  = 1
  threshold           = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  tags                = var.tags

  metric_query {
    id          = "errors"
    expression  = "SUM(METRICS())"
    label       = "Errors of the four functions"
    return_data = true
  }

  dynamic "metric_query" {
    for_each = aws_lambda_function.function

    content {
      id = metric_query.key

      metric {
        namespace   = "AWS/Lambda"
        metric_name = "Errors"
        dimensions  = { FunctionName = metric_query.value.function_name }
        period      = 300
        stat        = "Sum"
      }
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "no_recent_backup" {
  alarm_name          = "${local.name}-no-recent-backup"
  alarm_description   = "No backup of ${var.database_name} was sealed in the last ${var.max_backup_age_hours} hours (no data counts as none)."
  namespace           = "Tidemark"
  metric_name         = "BackupSucceeded"
  dimensions          = { database = var.database_name }
  statistic           = "Sum"
  period              = 3600
  evaluation_periods  = var.max_backup_age_hours
  datapoints_to_alarm = var.max_backup_age_hours
  threshold           = 1
  comparison_operator = "LessThanThreshold"
  treat_missing_data  = "breaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
  tags                = var.tags
}

resource "aws_cloudwatch_metric_alarm" "verification_failed" {
  alarm_name          = "${local.name}-verification-failed"
  alarm_description   = "A backup did not restore to what the source held; verifications/{id}.json names the table or object."
  namespace           = "Tidemark"
  metric_name         = "VerificationFailed"
  dimensions          = { database = var.database_name }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  threshold           = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  tags                = var.tags
}
