// Package dashboards ships the views people look at: a CloudWatch dashboard (the body
// `aws cloudwatch put-dashboard --dashboard-body file://cloudwatch.json` takes) and a
// Grafana dashboard for the Prometheus endpoint. Its test keeps them honest: they may
// reference only metric names and dimensions the agent really emits.
package dashboards

import _ "embed"

// CloudWatch is the CloudWatch dashboard body, for namespace IMDSGuard.
//
//go:embed cloudwatch.json
var CloudWatch []byte

// Grafana is the Grafana dashboard (Prometheus data source chosen on import).
//
//go:embed grafana.json
var Grafana []byte
