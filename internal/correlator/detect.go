package correlator

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/cloudwatch"
	"github.com/aws/aws-sdk-go-v2/service/eventbridge"
	"github.com/aws/aws-sdk-go-v2/service/securityhub"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/cli"
	"github.com/imdsguard/imdsguard/internal/correlator/config"
	"github.com/imdsguard/imdsguard/internal/correlator/investigate"
	"github.com/imdsguard/imdsguard/internal/correlator/outputs"
)

// inputs are the flags detect and investigate share: where the configuration,
// fingerprints and inventory come from.
type inputs struct {
	cfgPath, fpPath *string
	invPaths        fileList
}

func addInputFlags(fl *flag.FlagSet) *inputs {
	in := &inputs{
		cfgPath: fl.String("config", "", "config file"),
		fpPath:  fl.String("fingerprints", "", "JSON-lines file of host fingerprints"),
	}
	fl.Var(&in.invPaths, "inventory", "AWS CLI output of describe-network-interfaces, describe-addresses, describe-vpc-endpoints or lambda list-functions (repeatable)")
	return in
}

// open loads what the flags name, with progress on stderr when it is a terminal. The
// caller closes the env.
func (in *inputs) open(stderr io.Writer) (*env, *progress, error) {
	prog := newProgress(stderr)
	e, err := load(*in.cfgPath, *in.fpPath, prog.logWriter(stderr))
	if err != nil {
		return nil, nil, err
	}
	if err := e.addInventory(in.invPaths); err != nil {
		e.close()
		return nil, nil, err
	}
	return e, prog, nil
}

func cmdDetect(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("detect", flag.ContinueOnError)
	fl.SetOutput(io.Discard)
	in := addInputFlags(fl)
	if err := fl.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", cli.ErrUsage, err)
	}
	e, prog, err := in.open(stderr)
	if err != nil {
		return err
	}
	defer e.close()
	d := e.detector("")
	start := time.Now()
	prog.begin(fl.Args(), stderr)
	st, truncated, readErr := readInputs(ctx, fl.Args(), stdin, e.log, prog, d.Observe)
	prog.finish()
	all := d.Findings()
	var dropped int64
	for _, n := range d.Dropped() {
		dropped += n
	}
	out, err := newDispatcher(ctx, e, stdout, nil)
	if err != nil {
		return err
	}
	_, pubErr := out.Publish(ctx, all, time.Now())
	// One run: wait for every output to finish (their retries are bounded), or a signal.
	if err := errors.Join(pubErr, out.Close(ctx)); err != nil {
		return err
	}
	if failed := outputFailures(out); failed != "" {
		return fmt.Errorf("findings not delivered to %s", failed)
	}
	flagged := 0
	for _, f := range all {
		if !f.Suppressed {
			flagged++
		}
	}
	e.log.Info().Str("event", "detect_done").Int64("records", st.Records).Int64("malformed", st.Malformed).Int("truncated_files", truncated).
		Int64("dropped", dropped).Int("findings", flagged).Int("suppressed", len(all)-flagged).Dur("took", time.Since(start)).Msg("detection finished")
	return readErr
}

func cmdInvestigate(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fl := flag.NewFlagSet("investigate", flag.ContinueOnError)
	fl.SetOutput(io.Discard)
	in := addInputFlags(fl)
	key := fl.String("access-key", "", "access key id to investigate")
	format := fl.String("format", "text", "text or json")
	if err := fl.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", cli.ErrUsage, err)
	}
	if *key == "" {
		return fmt.Errorf("%w: investigate needs --access-key", cli.ErrUsage)
	}
	if *format != "text" && *format != "json" {
		return fmt.Errorf("%w: --format must be text or json", cli.ErrUsage)
	}
	e, prog, err := in.open(stderr)
	if err != nil {
		return err
	}
	defer e.close()
	d := e.detector(*key)
	prog.begin(fl.Args(), stderr)
	_, _, readErr := readInputs(ctx, fl.Args(), stdin, e.log, prog, d.Observe)
	prog.finish()
	story := investigate.Build(d, *key)
	if *format == "json" {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(story); err != nil {
			return fmt.Errorf("write story: %w", err)
		}
	} else if err := investigate.WriteText(stdout, story); err != nil {
		return fmt.Errorf("write story: %w", err)
	}
	return readErr
}

// newDispatcher starts the configured outputs behind one dispatcher. Stdout always
// receives the findings as JSON lines.
// l nil is a ledger in memory.
func newDispatcher(ctx context.Context, e *env, stdout io.Writer, l outputs.Ledger) (*outputs.Dispatcher, error) {
	outs, err := newOutputs(ctx, e.cfg.Outputs, stdout, e.log)
	if err != nil {
		return nil, err
	}
	return outputs.NewDispatcher(outs, e.cfg.Outputs.QueueSize, l, e.log), nil
}

func newOutputs(ctx context.Context, cfg config.Outputs, stdout io.Writer, log zerolog.Logger) ([]outputs.Output, error) {
	outs := []outputs.Output{&outputs.JSONLines{W: stdout}}
	if cfg.ASFFFile != "" {
		outs = append(outs, &outputs.ASFFFile{Path: cfg.ASFFFile, ProductARN: cfg.ASFFProductARN})
	}
	if cfg.MetricsFile != "" {
		outs = append(outs, &outputs.EMFFile{Path: cfg.MetricsFile, Namespace: cfg.MetricsNamespace})
	}
	if cfg.Webhook.URL != "" {
		outs = append(outs, &outputs.Webhook{URL: cfg.Webhook.URL, Retries: cfg.Webhook.Retries, Backoff: cfg.Webhook.Backoff,
			Client: newHTTPClient(cfg.Webhook.Timeout), Log: log})
	}
	if c := cfg.CloudWatch; c.Namespace != "" {
		region := c.Region
		if region == "" {
			region = "us-east-1"
		}
		awsCfg, err := awsconfig.LoadDefaultConfig(ctx, awsconfig.WithRegion(region))
		if err != nil {
			return nil, fmt.Errorf("load aws config: %w", err)
		}
		client := cloudwatch.NewFromConfig(awsCfg, func(o *cloudwatch.Options) {
			if c.Endpoint != "" {
				o.BaseEndpoint = aws.String(c.Endpoint)
			}
		})
		outs = append(outs, &outputs.CloudWatch{Client: client, Namespace: c.Namespace})
	}
	if c := cfg.EventBridge; c.EventBus != "" {
		awsCfg, err := awsconfig.LoadDefaultConfig(ctx, awsconfig.WithRegion(c.Region))
		if err != nil {
			return nil, fmt.Errorf("load aws config: %w", err)
		}
		client := eventbridge.NewFromConfig(awsCfg, func(o *eventbridge.Options) {
			if c.Endpoint != "" {
				o.BaseEndpoint = aws.String(c.Endpoint)
			}
		})
		outs = append(outs, &outputs.EventBridge{Client: client, Bus: c.EventBus, Source: c.Source,
			Retry: outputs.Retry{Retries: c.Retries, Backoff: c.Backoff}, Log: log})
	}
	if c := cfg.SecurityHub; c.Enabled {
		awsCfg, err := awsconfig.LoadDefaultConfig(ctx, awsconfig.WithRegion(c.Region))
		if err != nil {
			return nil, fmt.Errorf("load aws config: %w", err)
		}
		client := securityhub.NewFromConfig(awsCfg, func(o *securityhub.Options) {
			if c.Endpoint != "" {
				o.BaseEndpoint = aws.String(c.Endpoint)
			}
		})
		outs = append(outs, &outputs.SecurityHub{Client: client, ProductARN: cfg.ASFFProductARN,
			Retry: outputs.Retry{Retries: c.Retries, Backoff: c.Backoff}, Log: log})
	}
	return outs, nil
}

// outputFailures names the outputs that failed a batch, for detect's exit status; a
// webhook, EventBridge or Security Hub that stays down is logged and not fatal: the
// findings are on stdout.
func outputFailures(d *outputs.Dispatcher) string {
	var names []string
	for _, st := range d.Stats() {
		if st.Failed+st.Dropped+st.Abandoned == 0 {
			continue
		}
		switch st.Name {
		case "json_lines", "asff_file", "metrics_file":
			names = append(names, st.Name)
		}
	}
	return strings.Join(names, ", ")
}
