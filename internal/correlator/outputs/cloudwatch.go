package outputs

import (
	"context"
	"fmt"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/cloudwatch"
	"github.com/aws/aws-sdk-go-v2/service/cloudwatch/types"

	"github.com/imdsguard/imdsguard/internal/correlator/detector"
)

// CloudWatch puts the number of findings by type and severity as CloudWatch metrics
// ("Findings" and "SuppressedFindings", dimensions Type and Severity) with PutMetricData.
type CloudWatch struct {
	Client    *cloudwatch.Client
	Namespace string
}

// Put sends the counts of fs; nothing is sent for an empty fs.
func (c *CloudWatch) Put(ctx context.Context, fs []detector.Finding, now time.Time) error {
	type key struct{ typ, sev string }
	counts := map[key][2]float64{}
	var order []key
	for _, f := range fs {
		k := key{detector.ShortType(f.Type), f.Severity}
		n, seen := counts[k]
		if !seen {
			order = append(order, k)
		}
		if f.Suppressed {
			n[1]++
		} else {
			n[0]++
		}
		counts[k] = n
	}
	var data []types.MetricDatum
	for _, k := range order {
		dims := []types.Dimension{{Name: aws.String("Type"), Value: aws.String(k.typ)}, {Name: aws.String("Severity"), Value: aws.String(k.sev)}}
		for i, name := range []string{"Findings", "SuppressedFindings"} {
			data = append(data, types.MetricDatum{MetricName: aws.String(name), Dimensions: dims, Value: aws.Float64(counts[k][i]),
				Unit: types.StandardUnitCount, Timestamp: aws.Time(now)})
		}
	}
	// PutMetricData takes at most 1000 data per call.
	for len(data) > 0 {
		n := min(len(data), 1000)
		if _, err := c.Client.PutMetricData(ctx, &cloudwatch.PutMetricDataInput{Namespace: aws.String(c.Namespace), MetricData: data[:n]}); err != nil {
			return fmt.Errorf("put finding metrics: %w", err)
		}
		data = data[n:]
	}
	return nil
}
