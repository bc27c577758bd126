package outputs

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/securityhub"
	"github.com/aws/aws-sdk-go-v2/service/securityhub/types"
	"github.com/rs/zerolog"
)

// SecurityHub imports each changed finding, suppressed ones included (as workflow
// SUPPRESSED), into Security Hub with BatchImportFindings, in ASFF. Security Hub keeps
// one finding per Id, so an update replaces the earlier import.
type SecurityHub struct {
	Client *securityhub.Client
	// ProductARN is the findings' ProductArn; empty means each account's default product.
	ProductARN string
	Retry      Retry
	Log        zerolog.Logger
}

// Name implements Output.
func (s *SecurityHub) Name() string { return "security_hub" }

// batchImportMax is BatchImportFindings' limit of findings per call.
const batchImportMax = 100

// Deliver implements Output. Findings Security Hub refused are retried alone.
func (s *SecurityHub) Deliver(ctx context.Context, b *Batch) error {
	fs := make([]types.AwsSecurityFinding, 0, len(b.Changed))
	for _, f := range b.Changed {
		fs = append(fs, ToSecurityHub(ToASFF(f, s.ProductARN, b.Time)))
	}
	var errs []error
	for len(fs) > 0 {
		n := min(len(fs), batchImportMax)
		if err := s.put(ctx, fs[:n]); err != nil {
			errs = append(errs, err)
			if ctx.Err() != nil {
				break
			}
		}
		fs = fs[n:]
	}
	return errors.Join(errs...)
}

func (s *SecurityHub) put(ctx context.Context, fs []types.AwsSecurityFinding) error {
	pending := fs
	return s.Retry.Do(ctx, func(ctx context.Context) error {
		out, err := s.Client.BatchImportFindings(ctx, &securityhub.BatchImportFindingsInput{Findings: pending})
		if err != nil {
			return fmt.Errorf("batch import findings: %w", err)
		}
		if aws.ToInt32(out.FailedCount) == 0 {
			return nil
		}
		failed := map[string]string{}
		for _, e := range out.FailedFindings {
			failed[aws.ToString(e.Id)] = aws.ToString(e.ErrorCode) + ": " + aws.ToString(e.ErrorMessage)
		}
		var again []types.AwsSecurityFinding
		var msgs []string
		for _, f := range pending {
			if m, ok := failed[aws.ToString(f.Id)]; ok {
				again = append(again, f)
				msgs = append(msgs, aws.ToString(f.Id)+" ("+m+")")
			}
		}
		if len(again) == 0 {
			return fmt.Errorf("batch import findings: %d failed", aws.ToInt32(out.FailedCount))
		}
		pending = again
		return fmt.Errorf("batch import findings: %d failed: %s", len(again), strings.Join(msgs, ", "))
	}, func(attempt int, err error) {
		s.Log.Warn().Str("event", "security_hub_failed").Int("attempt", attempt).Err(err).Msg("findings not imported")
	})
}

// ToSecurityHub converts our ASFF document into the SDK's type.
func ToSecurityHub(a ASFF) types.AwsSecurityFinding {
	f := types.AwsSecurityFinding{
		SchemaVersion: aws.String(a.SchemaVersion), Id: aws.String(a.ID), ProductArn: aws.String(a.ProductARN),
		GeneratorId: aws.String(a.GeneratorID), AwsAccountId: aws.String(a.AWSAccountID), Types: a.Types,
		CreatedAt: aws.String(a.CreatedAt), UpdatedAt: aws.String(a.UpdatedAt),
		FirstObservedAt: aws.String(a.FirstObservedAt), LastObservedAt: aws.String(a.LastObservedAt),
		Severity:      &types.Severity{Label: types.SeverityLabel(a.Severity.Label), Original: aws.String(a.Severity.Original)},
		Title:         aws.String(a.Title),
		Description:   aws.String(a.Description),
		ProductFields: a.ProductFields,
		Workflow:      &types.Workflow{Status: types.WorkflowStatus(a.Workflow.Status)},
		RecordState:   types.RecordState(a.RecordState),
	}
	for _, r := range a.Resources {
		f.Resources = append(f.Resources, types.Resource{Type: aws.String(r.Type), Id: aws.String(r.ID), Region: optional(r.Region)})
	}
	if n := a.Network; n != nil {
		f.Network = &types.Network{Direction: types.NetworkDirection(n.Direction), SourceIpV4: optional(n.SourceIPV4), SourceIpV6: optional(n.SourceIPV6)}
	}
	if p := a.Process; p != nil {
		f.Process = &types.ProcessDetails{Name: optional(p.Name), Path: optional(p.Path)}
		if p.PID > 0 {
			f.Process.Pid = aws.Int32(int32(p.PID))
		}
	}
	return f
}

func optional(s string) *string {
	if s == "" {
		return nil
	}
	return aws.String(s)
}
