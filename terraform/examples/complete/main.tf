# A complete deployment: a database secret, the Tidemark module with its own bucket, the
# functions in the database's VPC, and an email for the alarms.
#
#   cargo lambda build --release --arm64 --output-format zip   # at the repository root
#   terraform init && terraform apply -var database_secret_arn=... -var 'subnet_ids=[...]' ...

terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  description = "AWS region of the database and the backups."
  type        = string
  default     = "eu-west-1"
}

variable "database_secret_arn" {
  description = "Secrets Manager secret of the database (RDS format)."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets that reach the database (empty: no VPC)."
  type        = list(string)
  default     = []
}

variable "security_group_ids" {
  description = "Security groups the database accepts on its port."
  type        = list(string)
  default     = []
}

variable "alarm_email" {
  description = "Who receives the alarms."
  type        = string
  default     = null
}

module "tidemark" {
  source = "../.."

  database_name        = "orders"
  database_secret_arn  = var.database_secret_arn
  sslmode              = "require"
  schemas              = ["public", "billing"]
  table_modes          = { "public.events" = "append" }
  subnet_ids           = var.subnet_ids
  security_group_ids   = var.security_group_ids
  alarm_email          = var.alarm_email
  max_backup_age_hours = 13
  keep_daily           = 7
  keep_weekly          = 4
  keep_monthly         = 12
  schedule_timezone    = "Europe/Paris"
  tags                 = { project = "tidemark", database = "orders" }
}

output "store_url" {
  description = "Restore with: tidemark restore --store <store_url> --target-url ..."
  value       = module.tidemark.store_url
}

output "state_machine_arn" {
  description = "The backup state machine."
  value       = module.tidemark.state_machine_arn
}

output "alarm_topic_arn" {
  description = "Where the alarms go."
  value       = module.tidemark.alarm_topic_arn
}
