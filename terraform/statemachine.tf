# -------------------------------------------------------------------- state machine

# The state machine and the schedules run as roles only their own service, in this
# account, can assume.
data "aws_iam_policy_document" "service_assume" {
  for_each = toset(["states", "scheduler"])

  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["${each.key}.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

data "aws_iam_policy_document" "states" {
  statement {
    sid     = "InvokeTheFunctions"
    actions = ["lambda:InvokeFunction"]
    resources = flatten([
      for f in aws_lambda_function.function : [f.arn, "${f.arn}:*"]
    ])
  }

  # Step Functions needs these on "*" to deliver execution logs to CloudWatch Logs.
  statement {
    sid = "DeliverExecutionLogs"
    actions = [
      "logs:CreateLogDelivery",
      "logs:GetLogDelivery",
      "logs:UpdateLogDelivery",
      "logs:DeleteLogDelivery",
      "logs:ListLogDeliveries",
      "logs:PutResourcePolicy",
      "logs:DescribeResourcePolicies",
      "logs:DescribeLogGroups",
    ]
    resources = ["*"]
  }
}

resource "aws_iam_role" "states" {
  name_prefix        = "${local.name}-sfn-"
  assume_role_policy = data.aws_iam_policy_document.service_assume["states"].json
  tags               = var.tags
}

resource "aws_iam_role_policy" "states" {
  name   = "tidemark"
  role   = aws_iam_role.states.id
  policy = data.aws_iam_policy_document.states.json

  # checkov:skip=CKV_AWS_111:Log delivery actions have no resource-level permissions; Step Functions documents them on "*".
  # checkov:skip=CKV_AWS_356:Same: log delivery actions only accept "*".
}

resource "aws_cloudwatch_log_group" "states" {
  name              = "/tidemark/${var.database_name}/state-machine"
  retention_in_days = var.log_retention_days
  tags              = var.tags

  # checkov:skip=CKV_AWS_158:Execution logs exclude execution data; CloudWatch encrypts them at rest.
  # checkov:skip=CKV_AWS_338:Retention is a variable (default 30 days).
}

resource "aws_sfn_state_machine" "backup" {
  name     = "${local.name}-backup"
  type     = "STANDARD"
  role_arn = aws_iam_role.states.arn
  tags     = var.tags

  # The same definition file SAM uses; ${...} are its substitutions.
  definition = templatefile("${path.module}/../statemachine/backup.asl.json", {
    ExportFunctionArn   = aws_lambda_function.function["export"].arn
    ManifestFunctionArn = aws_lambda_function.function["manifest"].arn
    VerifyFunctionArn   = aws_lambda_function.function["verify"].arn
    PruneFunctionArn    = aws_lambda_function.function["prune"].arn
    ExportConcurrency   = var.export_concurrency
  })

  logging_configuration {
    level                  = "ERROR"
    include_execution_data = false
    log_destination        = "${aws_cloudwatch_log_group.states.arn}:*"
  }

  # checkov:skip=CKV_AWS_284:X-Ray adds cost and little here: the execution history shows every step.
  # checkov:skip=CKV_AWS_285:Execution history is logged at ERROR level; execution data is left out on purpose.

  depends_on = [aws_iam_role_policy.states]
}

# ------------------------------------------------------------------------ schedules

data "aws_iam_policy_document" "scheduler" {
  statement {
    sid       = "StartBackups"
    actions   = ["states:StartExecution"]
    resources = [aws_sfn_state_machine.backup.arn]
  }
}

resource "aws_iam_role" "scheduler" {
  name_prefix        = "${local.name}-sched-"
  assume_role_policy = data.aws_iam_policy_document.service_assume["scheduler"].json
  tags               = var.tags
}

resource "aws_iam_role_policy" "scheduler" {
  name   = "start-backup"
  role   = aws_iam_role.scheduler.id
  policy = data.aws_iam_policy_document.scheduler.json
}

resource "aws_scheduler_schedule" "backup" {
  for_each = {
    incremental = var.incremental_schedule
    full        = var.full_schedule
  }

  name                         = "${local.name}-${each.key}"
  description                  = "${title(each.key)} backup run of ${var.database_name}."
  schedule_expression          = each.value
  schedule_expression_timezone = var.schedule_timezone
  state                        = var.schedules_enabled ? "ENABLED" : "DISABLED"

  # checkov:skip=CKV_AWS_297:The schedule holds only {"mode": ...}; AWS-owned keys encrypt it.

  flexible_time_window {
    mode = "OFF"
  }

  target {
    arn      = aws_sfn_state_machine.backup.arn
    role_arn = aws_iam_role.scheduler.arn
    input    = jsonencode({ mode = each.key })
  }
}
