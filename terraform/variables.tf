variable "database_name" {
  description = "Short name of the protected database: names the resources and is the `database` dimension of the Tidemark metrics."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,30}$", var.database_name))
    error_message = "database_name: lowercase letters, digits and hyphens, at most 31 characters."
  }
}

variable "database_secret_arn" {
  description = "ARN of the Secrets Manager secret with the connection, in the RDS format {\"username\",\"password\",\"host\",\"port\",\"dbname\"}."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", var.database_secret_arn))
    error_message = "database_secret_arn must be a Secrets Manager secret ARN."
  }
}

variable "sslmode" {
  description = "TLS to the database: disable, prefer, require, verify-ca or verify-full (verify-* need the server's CA in the trust store)."
  type        = string
  default     = "require"

  validation {
    condition     = contains(["disable", "prefer", "require", "verify-ca", "verify-full"], var.sslmode)
    error_message = "sslmode must be one of disable, prefer, require, verify-ca, verify-full."
  }
}

variable "schemas" {
  description = "Schemas to back up."
  type        = list(string)
  default     = ["public"]

  validation {
    condition     = length(var.schemas) > 0
    error_message = "schemas must name at least one schema."
  }
}

variable "table_modes" {
  description = "Per-table mode overrides, table name to snapshot, changes or append (e.g. { events = \"append\" })."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for m in values(var.table_modes) : contains(["snapshot", "changes", "append"], m)])
    error_message = "table_modes values must be snapshot, changes or append."
  }
}

variable "scratch_secret_arn" {
  description = "Secret of a separate server for verification restores; null restores into a scratch database on the source server."
  type        = string
  default     = null

  validation {
    condition     = var.scratch_secret_arn == null || can(regex("^arn:aws[a-z-]*:secretsmanager:", var.scratch_secret_arn))
    error_message = "scratch_secret_arn must be a Secrets Manager secret ARN or null."
  }
}

variable "bucket_name" {
  description = "Existing bucket to store backups in; null creates one (versioned, encrypted, private, TLS only)."
  type        = string
  default     = null
}

variable "store_prefix" {
  description = "Key prefix of this database's backups in the bucket; null uses database_name."
  type        = string
  default     = null

  validation {
    condition     = var.store_prefix == null || can(regex("^[A-Za-z0-9._/-]+$", var.store_prefix))
    error_message = "store_prefix: letters, digits, '.', '_', '-' and '/' only."
  }
}

variable "kms_key_arn" {
  description = "KMS key for the bucket (SSE-KMS) and the secret; null uses S3-managed keys and grants no KMS access."
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:", var.kms_key_arn))
    error_message = "kms_key_arn must be a KMS key ARN or null."
  }
}

variable "architecture" {
  description = "Lambda architecture the zips were built for (cargo lambda build --arm64 or --x86-64)."
  type        = string
  default     = "arm64"

  validation {
    condition     = contains(["arm64", "x86_64"], var.architecture)
    error_message = "architecture must be arm64 or x86_64."
  }
}

variable "function_memory" {
  description = "Memory of each function in MB (CPU grows with it; two cores from 1769 MB)."
  type        = number
  default     = 1769

  validation {
    condition     = var.function_memory >= 256 && var.function_memory <= 10240
    error_message = "function_memory must be between 256 and 10240."
  }
}

variable "export_concurrency" {
  description = "Export workers that run one backup at once (the state machine's Map; each its own invocation, connections and snapshot); an execution's input \"concurrency\" overrides it. 1 exports in one invocation at a time."
  type        = number
  default     = 4

  validation {
    condition     = var.export_concurrency >= 1 && var.export_concurrency <= 256 && floor(var.export_concurrency) == var.export_concurrency
    error_message = "export_concurrency must be a whole number from 1 to 256."
  }
}

variable "lambda_package_dir" {
  description = "Folder holding <binary>/bootstrap.zip as `cargo lambda build --release --arm64 --output-format zip` writes them; null uses the repository's target/lambda."
  type        = string
  default     = null
}

variable "subnet_ids" {
  description = "Private subnets to run the functions in (to reach a database in a VPC); empty runs them outside any VPC."
  type        = list(string)
  default     = []
}

variable "security_group_ids" {
  description = "Security groups of the functions when subnet_ids is set; the database must accept them on its port."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.security_group_ids) <= 5
    error_message = "Lambda accepts at most 5 security groups."
  }
}

variable "log_retention_days" {
  description = "Days to keep the functions' and the state machine's logs."
  type        = number
  default     = 30

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a value CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, ...)."
  }
}

variable "schedules_enabled" {
  description = "Whether the schedules start backups."
  type        = bool
  default     = true
}

variable "incremental_schedule" {
  description = "EventBridge Scheduler expression for incremental backups."
  type        = string
  default     = "rate(6 hours)"

  validation {
    condition     = can(regex("^(rate|cron|at)\\(.+\\)$", var.incremental_schedule))
    error_message = "incremental_schedule must be a rate(...), cron(...) or at(...) expression."
  }
}

variable "full_schedule" {
  description = "EventBridge Scheduler expression for full backups."
  type        = string
  default     = "cron(0 3 ? * SUN *)"

  validation {
    condition     = can(regex("^(rate|cron|at)\\(.+\\)$", var.full_schedule))
    error_message = "full_schedule must be a rate(...), cron(...) or at(...) expression."
  }
}

variable "schedule_timezone" {
  description = "IANA time zone of the cron expressions and of the retention calendar."
  type        = string
  default     = "UTC"
}

variable "keep_daily" {
  description = "Daily backups to keep."
  type        = number
  default     = 7

  validation {
    condition     = var.keep_daily >= 0 && floor(var.keep_daily) == var.keep_daily
    error_message = "keep_daily must be a whole number, 0 or more."
  }
}

variable "keep_weekly" {
  description = "Weekly backups to keep."
  type        = number
  default     = 4

  validation {
    condition     = var.keep_weekly >= 0 && floor(var.keep_weekly) == var.keep_weekly
    error_message = "keep_weekly must be a whole number, 0 or more."
  }
}

variable "keep_monthly" {
  description = "Monthly backups to keep."
  type        = number
  default     = 12

  validation {
    condition     = var.keep_monthly >= 0 && floor(var.keep_monthly) == var.keep_monthly
    error_message = "keep_monthly must be a whole number, 0 or more."
  }
}

variable "alarm_email" {
  description = "Email address subscribed to the alarm topic; null subscribes nobody."
  type        = string
  default     = null
}

variable "max_backup_age_hours" {
  description = "Alarm when no backup succeeded for this many hours."
  type        = number
  default     = 13

  validation {
    condition     = var.max_backup_age_hours >= 1 && var.max_backup_age_hours <= 168
    error_message = "max_backup_age_hours must be between 1 and 168."
  }
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}
