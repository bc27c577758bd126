# Packer template: bakes imdsguard into an AMI with the amazon-ebs builder.
#
#   packer init packaging/ami
#   packer build -var package=dist/imdsguard-1.2.3-1.x86_64.rpm \
#                -var config=/path/to/config.yaml packaging/ami
#
# The base image defaults to the newest Amazon Linux 2023; for Ubuntu or Debian set
# source_ami_name, source_ami_owner and ssh_username, and pass the .deb.

packer {
  required_plugins {
    amazon = {
      version = ">= 1.3.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}

variable "package" {
  type        = string
  description = "Path of the imdsguard .rpm or .deb to install (built by make package)."
}

variable "config" {
  type        = string
  default     = ""
  description = "Path of a config.yaml for /etc/imdsguard/config.yaml; empty keeps the package's defaults."
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "arch" {
  type        = string
  default     = "x86_64"
  description = "x86_64 or arm64; must match the package."
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}

variable "source_ami_name" {
  type    = string
  default = "al2023-ami-2023.*"
}

variable "source_ami_owner" {
  type    = string
  default = "amazon"
}

variable "ssh_username" {
  type    = string
  default = "ec2-user"
}

variable "http_tokens" {
  type        = string
  default     = "required"
  description = "IMDSv2 only (required) or v1 and v2 (optional): for the build instance, and, when required, for every instance launched from the AMI (ImdsSupport v2.0)."
  validation {
    condition     = contains(["required", "optional"], var.http_tokens)
    error_message = "The http_tokens value must be \"required\" or \"optional\"."
  }
}

variable "http_put_response_hop_limit" {
  type        = number
  default     = 1
  description = "IMDS hop limit of the build instance: 1 keeps IMDS from containers on bridge networks, 2 lets them reach it. Instances launched from the AMI take theirs from the launch template."
}

locals {
  timestamp = regex_replace(timestamp(), "[- TZ:]", "")
}

source "amazon-ebs" "imdsguard" {
  region        = var.region
  instance_type = var.instance_type
  ssh_username  = var.ssh_username
  ami_name      = "imdsguard-${var.arch}-${local.timestamp}"

  source_ami_filter {
    filters = {
      name                = var.source_ami_name
      architecture        = var.arch
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = [var.source_ami_owner]
    most_recent = true
  }

  # The build instance itself.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = var.http_tokens
    http_put_response_hop_limit = var.http_put_response_hop_limit
  }

  # Instances launched from the AMI require IMDSv2 by default.
  imds_support = var.http_tokens == "required" ? "v2.0" : ""

  tags = {
    Name      = "imdsguard-${var.arch}"
    imdsguard = "baked"
  }
}

build {
  sources = ["source.amazon-ebs.imdsguard"]

  provisioner "file" {
    source      = var.package
    destination = "/tmp/${basename(var.package)}"
  }

  # Without a config, a placeholder is uploaded (content may not be empty) and CONFIG
  # stays empty below, so the package's defaults stay.
  provisioner "file" {
    content     = var.config == "" ? "# no config given\n" : file(var.config)
    destination = "/tmp/imdsguard-config.yaml"
  }

  provisioner "shell" {
    script          = "${path.root}/install-imdsguard.sh"
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "PACKAGE=/tmp/${basename(var.package)}",
      var.config == "" ? "CONFIG=" : "CONFIG=/tmp/imdsguard-config.yaml",
    ]
  }
}
