# ------------------------------------------------------------------- function roles

data "aws_iam_policy_document" "lambda_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "function" {
  for_each = local.functions

  statement {
    sid       = "ListThePrefix"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${local.prefix}/*"]
    }
  }

  statement {
    sid       = "ObjectsUnderThePrefix"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${local.bucket_arn}/${local.prefix}/*"]
  }

  statement {
    sid       = "OwnLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.function[each.key].arn}:*"]
  }

  dynamic "statement" {
    for_each = each.value.secrets ? [1] : []

    content {
      sid       = "TheSecrets"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = local.secrets
    }
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [1]

    content {
      sid       = "TheKmsKey"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [var.kms_key_arn]
    }
  }
}

resource "aws_iam_role" "function" {
  for_each           = local.functions
  name_prefix        = "${local.name}-${each.key}-"
  assume_role_policy = data.aws_iam_policy_document.lambda_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy" "function" {
  for_each = local.functions
  name     = "tidemark"
  role     = aws_iam_role.function[each.key].id
  policy   = data.aws_iam_policy_document.function[each.key].json
}

resource "aws_iam_role_policy_attachment" "vpc" {
  for_each   = local.in_vpc ? local.functions : {}
  role       = aws_iam_role.function[each.key].name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"
}

# ------------------------------------------------------------------------ functions

resource "aws_cloudwatch_log_group" "function" {
  for_each          = local.functions
  name              = "/tidemark/${var.database_name}/${each.key}"
  retention_in_days = var.log_retention_days
  tags              = var.tags

  # checkov:skip=CKV_AWS_158:Logs hold run ids, counts and errors, never data or secrets; CloudWatch encrypts them at rest.
  # checkov:skip=CKV_AWS_338:Retention is a variable (default 30 days); backups, not logs, are what must last.
}

# pg_dump and pg_dumpall 18 with their libraries: export captures each backup's schema
# with them, verify compares the restored schema.
resource "aws_lambda_layer_version" "pg_dump" {
  layer_name               = "${local.name}-pg-dump"
  description              = "pg_dump and pg_dumpall 18 for Tidemark's schema capture (PostgreSQL licence)."
  filename                 = "${local.package_dir}/pg-dump-layer.zip"
  source_code_hash         = filebase64sha256("${local.package_dir}/pg-dump-layer.zip")
  compatible_runtimes      = ["provided.al2023"]
  compatible_architectures = [var.architecture]
  license_info             = "PostgreSQL"
}

resource "aws_lambda_function" "function" {
  for_each         = local.functions
  function_name    = "${local.name}-${each.key}"
  description      = each.value.description
  role             = aws_iam_role.function[each.key].arn
  filename         = "${local.package_dir}/${each.value.binary}/bootstrap.zip"
  source_code_hash = filebase64sha256("${local.package_dir}/${each.value.binary}/bootstrap.zip")
  runtime          = "provided.al2023"
  handler          = "bootstrap"
  architectures    = [var.architecture]
  timeout          = 900
  memory_size      = var.function_memory
  layers           = each.value.pg_dump ? [aws_lambda_layer_version.pg_dump.arn] : []
  tags             = var.tags

  # checkov:skip=CKV_AWS_115:The store lease already runs one backup at a time; reserved concurrency would take from the account's pool.
  # checkov:skip=CKV_AWS_116:Step Functions invokes the functions synchronously and retries or catches their errors; a DLQ only serves asynchronous invokes.
  # checkov:skip=CKV_AWS_173:The environment holds no secret (the secret's ARN, the store URL, settings).
  # checkov:skip=CKV_AWS_117:Runs in a VPC when subnet_ids is given; a database reachable from the internet needs none.
  # checkov:skip=CKV_AWS_272:Code signing needs a signing profile the operator owns; the zips are built from this repository.
  # checkov:skip=CKV_AWS_50:X-Ray adds cost and little here: each invocation logs its timings and emits metrics.

  logging_config {
    log_format = "JSON"
    log_group  = aws_cloudwatch_log_group.function[each.key].name
  }

  environment {
    variables = { for k, v in merge(local.common_env, each.value.env) : k => v if v != "" }
  }

  dynamic "vpc_config" {
    for_each = local.in_vpc ? [1] : []

    content {
      subnet_ids         = var.subnet_ids
      security_group_ids = var.security_group_ids
    }
  }

  depends_on = [aws_iam_role_policy.function, aws_iam_role_policy_attachment.vpc]
}
