package outputs

import (
	"context"
	"fmt"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/cloudwatch"
	"github.com/aws/aws-sdk-go-v2/service/cloudwatch/types"
)

// CloudWatch puts the number of findings by type and severity as CloudWatch metrics
// ("Findings" and "SuppressedFindings", dimensions Type and Severity) with PutMetricData.
type CloudWatch struct {
	Client    *cloudwatch.Client
	Namespace string
}

// Name implements Output.
func (c *CloudWatch) Name() string { return "cloudwatch" }

// Deliver implements Output.
func (c *CloudWatch) Deliver(ctx context.Context, b *Batch) error {
	return c.Put(ctx, b.Counts, b.Time)
}

// Put sends counts; nothing is sent for no counts.
func (c *CloudWatch) Put(ctx context.Context, counts []Count, now time.Time) error {
	var data []types.MetricDatum
	for _, k := range counts {
		dims := []types.Dimension{{Name: aws.String("Type"), Value: aws.String(k.Type)}, {Name: aws.String("Severity"), Value: aws.String(k.Severity)}}
		for i, name := range []string{"Findings", "SuppressedFindings"} {
			v := [2]int{k.Findings, k.Suppressed}[i]
			data = append(data, types.MetricDatum{MetricName: aws.String(name), Dimensions: dims, Value: aws.Float64(float64(v)),
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
