// Package outputs delivers the detector's findings, each destination behind the one
// Output interface and fed by a Dispatcher off the detection path: JSON lines (the
// stable schema), AWS Security Finding Format files, Security Hub (BatchImportFindings),
// EventBridge events in GuardDuty's shape (PutEvents), a webhook, and counts of findings
// as CloudWatch metrics (PutMetricData, or Embedded Metric Format lines). A new
// destination is one file.
package outputs

import (
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/imdsguard/imdsguard/internal/atomicfile"
	"github.com/imdsguard/imdsguard/internal/correlator/detector"
)

// WriteJSONLines writes one finding per line.
func WriteJSONLines(w io.Writer, fs []detector.Finding) error {
	enc := json.NewEncoder(w)
	for i := range fs {
		if err := enc.Encode(&fs[i]); err != nil {
			return fmt.Errorf("write finding: %w", err)
		}
	}
	return nil
}

// ASFF is one finding in AWS Security Finding Format (the fields we fill).
type ASFF struct {
	SchemaVersion   string            `json:"SchemaVersion"`
	ID              string            `json:"Id"`
	ProductARN      string            `json:"ProductArn"`
	GeneratorID     string            `json:"GeneratorId"`
	AWSAccountID    string            `json:"AwsAccountId"`
	Types           []string          `json:"Types"`
	CreatedAt       string            `json:"CreatedAt"`
	UpdatedAt       string            `json:"UpdatedAt"`
	FirstObservedAt string            `json:"FirstObservedAt"`
	LastObservedAt  string            `json:"LastObservedAt"`
	Severity        ASFFSeverity      `json:"Severity"`
	Title           string            `json:"Title"`
	Description     string            `json:"Description"`
	Resources       []ASFFResource    `json:"Resources"`
	Network         *ASFFNetwork      `json:"Network,omitempty"`
	Process         *ASFFProcess      `json:"Process,omitempty"`
	ProductFields   map[string]string `json:"ProductFields"`
	Workflow        struct {
		Status string `json:"Status"`
	} `json:"Workflow"`
	RecordState string `json:"RecordState"`
}

// ASFFSeverity is the Severity object.
type ASFFSeverity struct {
	Label    string `json:"Label"`
	Original string `json:"Original"`
}

// ASFFResource is one affected resource.
type ASFFResource struct {
	Type   string `json:"Type"`
	ID     string `json:"Id"`
	Region string `json:"Region,omitempty"`
}

// ASFFNetwork carries the source address.
type ASFFNetwork struct {
	Direction  string `json:"Direction"`
	SourceIPV4 string `json:"SourceIpV4,omitempty"`
	SourceIPV6 string `json:"SourceIpV6,omitempty"`
}

// ASFFProcess is the host process that fetched the credential.
type ASFFProcess struct {
	Name string `json:"Name,omitempty"`
	Path string `json:"Path,omitempty"`
	PID  int    `json:"Pid,omitempty"`
}

// DefaultProductARN is the account's own "default" Security Hub product.
func DefaultProductARN(region, account string) string {
	return fmt.Sprintf("arn:aws:securityhub:%s:%s:product/%s/default", region, account, account)
}

// ToASFF converts f. productARN may be empty (the account's default product).
func ToASFF(f detector.Finding, productARN string, now time.Time) ASFF {
	region := f.Region
	if region == "" {
		region = "us-east-1"
	}
	if productARN == "" {
		productARN = DefaultProductARN(region, f.AccountID)
	}
	short := detector.ShortType(f.Type)
	a := ASFF{
		SchemaVersion: "2018-10-08", ID: f.ID, ProductARN: productARN, GeneratorID: "imdsguard-correlator/" + short,
		AWSAccountID: f.AccountID, Types: []string{"TTPs/Credential Access/" + short},
		CreatedAt: f.FirstSeen.UTC().Format(time.RFC3339), UpdatedAt: now.UTC().Format(time.RFC3339),
		FirstObservedAt: f.FirstSeen.UTC().Format(time.RFC3339), LastObservedAt: f.LastSeen.UTC().Format(time.RFC3339),
		Severity:    ASFFSeverity{Label: strings.ToUpper(f.Severity), Original: f.Severity},
		Title:       fmt.Sprintf("%s: credentials of %s used from %s", short, owner(f), f.SourceIP),
		Description: truncate(f.Reason, 1024),
		Resources:   []ASFFResource{{Type: "AwsIamAccessKey", ID: f.AccessKeyID, Region: region}},
		ProductFields: map[string]string{
			"imdsguard/type": f.Type, "imdsguard/count": fmt.Sprint(f.Count), "imdsguard/role": f.Role,
			"imdsguard/credential_source": f.CredentialSource, "imdsguard/imds_version": f.IMDSVersion,
		},
		RecordState: "ACTIVE",
	}
	a.Workflow.Status = "NEW"
	if f.Suppressed {
		a.Workflow.Status = "SUPPRESSED"
		a.ProductFields["imdsguard/suppressed_by"] = f.SuppressedBy
	}
	if f.InstanceID != "" {
		a.Resources = append(a.Resources, ASFFResource{Type: "AwsEc2Instance", ID: fmt.Sprintf("arn:aws:ec2:%s:%s:instance/%s", region, f.AccountID, f.InstanceID), Region: region})
	}
	if f.FunctionName != "" {
		a.Resources = append(a.Resources, ASFFResource{Type: "AwsLambdaFunction", ID: fmt.Sprintf("arn:aws:lambda:%s:%s:function:%s", region, f.AccountID, f.FunctionName), Region: region})
	}
	if strings.Contains(f.SourceIP, ":") {
		a.Network = &ASFFNetwork{Direction: "IN", SourceIPV6: f.SourceIP}
	} else if f.SourceIP != "" {
		a.Network = &ASFFNetwork{Direction: "IN", SourceIPV4: f.SourceIP}
	}
	if len(f.Processes) > 0 {
		p := f.Processes[0]
		a.Process = &ASFFProcess{Name: filepath.Base(p.Exe), Path: p.Exe, PID: p.PID}
		a.ProductFields["imdsguard/process_user"] = p.User
		if p.Unit != "" {
			a.ProductFields["imdsguard/process_unit"] = p.Unit
		}
	}
	for k, v := range a.ProductFields {
		if v == "" {
			delete(a.ProductFields, k)
		}
	}
	return a
}

func owner(f detector.Finding) string {
	if f.InstanceID != "" {
		return "instance " + f.InstanceID
	}
	return "Lambda function " + f.FunctionName
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// WriteASFFFile replaces path with {"Findings":[...]} (the BatchImportFindings input),
// atomically: readers never see half a file.
func WriteASFFFile(path string, fs []detector.Finding, productARN string, now time.Time) error {
	doc := struct {
		Findings []ASFF `json:"Findings"`
	}{Findings: []ASFF{}}
	for _, f := range fs {
		doc.Findings = append(doc.Findings, ToASFF(f, productARN, now))
	}
	data, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return fmt.Errorf("marshal asff: %w", err)
	}
	return atomicfile.Write(path, append(data, '\n'), 0o644)
}

// WriteMetrics appends CloudWatch Embedded Metric Format lines, one per type and
// severity: metrics "Findings" and "SuppressedFindings" in namespace. The CloudWatch
// agent or a Lambda log group turns them into metrics without an API call from the
// correlator.
func WriteMetrics(w io.Writer, namespace string, counts []Count, now time.Time) error {
	enc := json.NewEncoder(w)
	for _, c := range counts {
		line := map[string]any{
			"_aws": map[string]any{
				"Timestamp": now.UnixMilli(),
				"CloudWatchMetrics": []any{map[string]any{
					"Namespace":  namespace,
					"Dimensions": [][]string{{"Type", "Severity"}},
					"Metrics":    []any{map[string]string{"Name": "Findings", "Unit": "Count"}, map[string]string{"Name": "SuppressedFindings", "Unit": "Count"}},
				}},
			},
			"Type": c.Type, "Severity": c.Severity, "Findings": c.Findings, "SuppressedFindings": c.Suppressed,
		}
		if err := enc.Encode(line); err != nil {
			return fmt.Errorf("write metric: %w", err)
		}
	}
	return nil
}
