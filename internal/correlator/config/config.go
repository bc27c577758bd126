// Package config reads and validates the correlator's YAML configuration. Like
// the agent's, every error names the file, line and key, and a file with any error is
// refused whole.
package config

import (
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/imdsguard/imdsguard/internal/yamlfile"
)

// Config is the correlator's configuration. `ip_ranges`, `affiliate_accounts`,
// `egress_cidrs` and `trusted_cidrs` are a contract with operators: rename nothing.
type Config struct {
	// IPRanges is AWS's ip-ranges.json, as AWS publishes it.
	IPRanges string `yaml:"ip_ranges"`
	// AffiliateAccounts are accounts whose use of a credential is less alarming (e.g. the
	// organization's): InsideAWS findings from them are Medium instead of High.
	AffiliateAccounts []string `yaml:"affiliate_accounts"`
	// EgressCIDRs are NAT / egress addresses any instance may call from.
	EgressCIDRs []string `yaml:"egress_cidrs"`
	// TrustedCIDRs suppress findings whose source is inside them (on-premises egress).
	TrustedCIDRs []string `yaml:"trusted_cidrs"`
	// Window is the time bucket of a finding: one finding per (key, source, type, window).
	Window time.Duration `yaml:"window"`
	// Suppress rules: a finding matching every non-empty field of a rule is suppressed.
	Suppress []Rule `yaml:"suppress"`
	// Fingerprints is an optional JSON-lines file of host fingerprints to load at start.
	Fingerprints string `yaml:"fingerprints"`
	// Inventory says where instances, VPC endpoints and Lambda functions are, from the
	// EC2 and Lambda APIs: evidence the detector uses before any guess.
	Inventory Inventory `yaml:"inventory"`
	Outputs   Outputs   `yaml:"outputs"`
	Serve     Serve     `yaml:"serve"`
	Intake    Intake    `yaml:"intake"`
	Store     Store     `yaml:"store"`
	Log       Log       `yaml:"log"`

	Egress  []netip.Prefix `yaml:"-"`
	Trusted []netip.Prefix `yaml:"-"`
}

// Inventory lists files of AWS CLI output (aws ec2 describe-network-interfaces,
// describe-addresses, describe-vpc-endpoints, aws lambda list-functions), loaded at start
// by every command, like --inventory; and, for serve, what to ask the EC2 API.
type Inventory struct {
	Files []string     `yaml:"files"`
	EC2   EC2Inventory `yaml:"ec2"`
}

// EC2Inventory makes serve poll the EC2 API (DescribeNetworkInterfaces,
// DescribeAddresses, DescribeVpcEndpoints) in each region, for its own account or, with
// RoleARNs, for each member account through the role it assumes there.
type EC2Inventory struct {
	Regions  []string      `yaml:"regions"`
	RoleARNs []string      `yaml:"role_arns"`
	Interval time.Duration `yaml:"interval"`
}

// Rule is one suppression rule.
type Rule struct {
	Name     string   `yaml:"name"`
	Types    []string `yaml:"types"`
	Roles    []string `yaml:"roles"`
	Accounts []string `yaml:"accounts"`
	CIDRs    []string `yaml:"cidrs"`

	Prefixes []netip.Prefix `yaml:"-"`
}

// Outputs are where findings go besides stdout.
type Outputs struct {
	// ASFFFile, when set, receives the findings in AWS Security Finding Format (a JSON
	// array, rewritten at the end of a run or after each serve cycle).
	ASFFFile string `yaml:"asff_file"`
	// ASFFProductARN is the ProductArn of ASFF findings; default: the account's
	// Security Hub "default" product in us-east-1.
	ASFFProductARN string  `yaml:"asff_product_arn"`
	Webhook        Webhook `yaml:"webhook"`
	// MetricsFile, when set, is appended CloudWatch Embedded Metric Format lines: the
	// number of findings by type and severity.
	MetricsFile string `yaml:"metrics_file"`
	// MetricsNamespace is the namespace of the metrics_file's EMF lines.
	MetricsNamespace string `yaml:"metrics_namespace"`
	// CloudWatch, when Namespace is set, receives the same counts with PutMetricData.
	CloudWatch CloudWatch `yaml:"cloudwatch"`
	// EventBridge, when EventBus is set, receives each finding as an event shaped like
	// GuardDuty's.
	EventBridge EventBridge `yaml:"eventbridge"`
	// SecurityHub, when Enabled, receives each finding with BatchImportFindings (ASFF).
	SecurityHub SecurityHub `yaml:"security_hub"`
	// QueueSize is how many detection cycles' findings each output may have waiting;
	// past that an output that is behind misses a cycle (logged and counted) rather
	// than slowing detection.
	QueueSize int `yaml:"queue_size"`
	// ShutdownGrace is how long a stopping correlator waits for queued findings to be
	// delivered.
	ShutdownGrace time.Duration `yaml:"shutdown_grace"`
}

// EventBridge says where finding events are put.
type EventBridge struct {
	// EventBus is the bus name or ARN; "default" is the account's default bus.
	EventBus string `yaml:"event_bus"`
	// Source is the events' source (AWS reserves "aws.*").
	Source   string `yaml:"source"`
	Region   string `yaml:"region"`
	Endpoint string `yaml:"endpoint"`
	Retries  int    `yaml:"retries"`
	// Backoff is the first wait before retrying refused entries; it doubles each time.
	Backoff time.Duration `yaml:"backoff"`
}

// SecurityHub says where findings are imported. Their ProductArn is asff_product_arn.
type SecurityHub struct {
	Enabled  bool          `yaml:"enabled"`
	Region   string        `yaml:"region"`
	Endpoint string        `yaml:"endpoint"`
	Retries  int           `yaml:"retries"`
	Backoff  time.Duration `yaml:"backoff"`
}

// CloudWatch says where finding metrics are put.
type CloudWatch struct {
	Namespace string `yaml:"namespace"`
	Region    string `yaml:"region"`
	// Endpoint overrides the CloudWatch endpoint (VPC endpoints, tests).
	Endpoint string `yaml:"endpoint"`
}

// Webhook POSTs each finding as JSON.
type Webhook struct {
	URL     string        `yaml:"url"`
	Retries int           `yaml:"retries"`
	Timeout time.Duration `yaml:"timeout"`
	// Backoff is the first wait between attempts; it doubles each time.
	Backoff time.Duration `yaml:"backoff"`
}

// Serve configures continuous detection.
type Serve struct {
	// Directory is followed: files that appear in it (recursively) are read once.
	Directory string `yaml:"directory"`
	S3        S3     `yaml:"s3"`
	// SQS, when QueueURL is set, is where S3 ObjectCreated notifications of the trail
	// bucket come from (several replicas share the queue); objects are read with the
	// S3 client that serve.s3's region, endpoint and path_style describe.
	SQS SQS `yaml:"sqs"`
	// Checkpoint records which files were read, so a restart neither skips nor repeats.
	Checkpoint   string        `yaml:"checkpoint"`
	PollInterval time.Duration `yaml:"poll_interval"`
}

// SQS is a queue of S3 notifications.
type SQS struct {
	QueueURL string `yaml:"queue_url"`
	Region   string `yaml:"region"`
	// Endpoint overrides the SQS endpoint (VPC endpoints, tests).
	Endpoint string `yaml:"endpoint"`
	// VisibilityTimeout is how long a received message is hidden from the other
	// replicas: longer than reading its objects and recording their findings takes.
	VisibilityTimeout time.Duration `yaml:"visibility_timeout"`
}

// S3 is a bucket and prefix of CloudTrail log files.
type S3 struct {
	Bucket string `yaml:"bucket"`
	Prefix string `yaml:"prefix"`
	Region string `yaml:"region"`
	// Endpoint overrides the S3 endpoint (S3-compatible stores, tests).
	Endpoint  string `yaml:"endpoint"`
	PathStyle bool   `yaml:"path_style"`
}

// Intake configures the fingerprint API that agents post to (POST /v1/fingerprints). It
// is off unless Listen is set.
type Intake struct {
	// Listen is host:port of the HTTPS listener.
	Listen string `yaml:"listen"`
	// TLSCert and TLSKey are the server's certificate chain and key (PEM files).
	TLSCert string `yaml:"tls_cert"`
	TLSKey  string `yaml:"tls_key"`
	// ClientCA, when set, is a PEM file of CAs: a client certificate they issued is
	// accepted instead of an identity document (mTLS, for senders that are not EC2).
	ClientCA string `yaml:"client_ca"`
	// PlainHTTP serves without TLS; refused unless Listen is a loopback address.
	PlainHTTP bool `yaml:"plain_http"`
	// AWSCertificates are the PEM files of the AWS certificates that sign instance
	// identity documents (the region's pkcs7 certificate, as AWS publishes it).
	AWSCertificates []string `yaml:"aws_certificates"`
	// AllowedAccounts are the accounts whose instances may send fingerprints.
	AllowedAccounts []string `yaml:"allowed_accounts"`
	// Database is the SQLite file fingerprints are stored in.
	Database string `yaml:"database"`
	// PurgeGrace is how long a fingerprint is kept after its credential expired.
	PurgeGrace time.Duration `yaml:"purge_grace"`
}

// Store is the correlator's database: the intake's fingerprints and, on PostgreSQL,
// the findings already published, shared by every replica.
type Store struct {
	// Driver is "sqlite" (embedded, one process) or "postgres" (replicas).
	Driver string `yaml:"driver"`
	// DSN is, for sqlite, the database file (default: intake.database); for postgres, a
	// connection string ("postgres://user@host/db" or "host=… dbname=…").
	DSN string `yaml:"dsn"`
}

// Log configures the correlator's diagnostics (zerolog JSON lines).
type Log struct {
	Level  string `yaml:"level"`
	Output string `yaml:"output"`
}

// Default returns the configuration used for every key a file leaves out.
func Default() Config {
	return Config{
		Window: time.Hour,
		Outputs: Outputs{Webhook: Webhook{Retries: 5, Timeout: 10 * time.Second, Backoff: 500 * time.Millisecond},
			MetricsNamespace: "imdsguard", QueueSize: 256, ShutdownGrace: 10 * time.Second,
			EventBridge: EventBridge{Source: "imdsguard", Region: "us-east-1", Retries: 5, Backoff: 500 * time.Millisecond},
			SecurityHub: SecurityHub{Region: "us-east-1", Retries: 5, Backoff: 500 * time.Millisecond}},
		Serve: Serve{PollInterval: 30 * time.Second, S3: S3{Region: "us-east-1"},
			SQS: SQS{Region: "us-east-1", VisibilityTimeout: 5 * time.Minute}},
		Intake:    Intake{PurgeGrace: 24 * time.Hour},
		Store:     Store{Driver: "sqlite"},
		Log:       Log{Level: "info", Output: "stderr"},
		Inventory: Inventory{EC2: EC2Inventory{Interval: 15 * time.Minute}},
	}
}

// Load reads and validates the file at path.
func Load(path string) (Config, error) { return yamlfile.Load(path, Default()) }

// Parse decodes and validates YAML. Unknown keys, wrong types and bad values are errors.
func Parse(data []byte) (Config, error) { return yamlfile.Parse(data, Default()) }

// Validate checks the decoded values; errors name the key and its line in root.
func (c *Config) Validate(root *yaml.Node) error {
	bad := func(key, format string, args ...any) error {
		return yamlfile.Errorf(root, key, format, args...)
	}
	var err error
	if c.IPRanges != "" && !filepath.IsAbs(c.IPRanges) {
		return bad("ip_ranges", "must be an absolute path, got %q", c.IPRanges)
	}
	for i, a := range c.AffiliateAccounts {
		if !IsAccountID(a) {
			return &yamlfile.Error{Line: yamlfile.LineOf(root, fmt.Sprintf("%s[%d]", "affiliate_accounts", i)), Key: fmt.Sprintf("affiliate_accounts[%d]", i), Msg: fmt.Sprintf("not a 12-digit account id: %q", a)}
		}
	}
	if c.Egress, err = prefixes(root, "egress_cidrs", c.EgressCIDRs); err != nil {
		return err
	}
	if c.Trusted, err = prefixes(root, "trusted_cidrs", c.TrustedCIDRs); err != nil {
		return err
	}
	if c.Window < time.Minute || c.Window > 7*24*time.Hour {
		return bad("window", "must be between 1m and 168h, got %s", c.Window)
	}
	for i := range c.Suppress {
		r := &c.Suppress[i]
		key := fmt.Sprintf("suppress[%d]", i)
		line := yamlfile.LineOf(root, fmt.Sprintf("%s[%d]", "suppress", i))
		if len(r.Types)+len(r.Roles)+len(r.Accounts)+len(r.CIDRs) == 0 {
			return &yamlfile.Error{Line: line, Key: key, Msg: "rule matches everything: give types, roles, accounts or cidrs"}
		}
		for _, a := range r.Accounts {
			if !IsAccountID(a) {
				return &yamlfile.Error{Line: line, Key: key + ".accounts", Msg: fmt.Sprintf("not a 12-digit account id: %q", a)}
			}
		}
		for _, s := range r.CIDRs {
			p, err := ParsePrefix(s)
			if err != nil {
				return &yamlfile.Error{Line: line, Key: key + ".cidrs", Msg: err.Error()}
			}
			r.Prefixes = append(r.Prefixes, p)
		}
	}
	if c.Fingerprints != "" && !filepath.IsAbs(c.Fingerprints) {
		return bad("fingerprints", "must be an absolute path, got %q", c.Fingerprints)
	}
	for i, p := range c.Inventory.Files {
		if !filepath.IsAbs(p) {
			return &yamlfile.Error{Line: yamlfile.LineOf(root, fmt.Sprintf("%s[%d]", "inventory.files", i)), Key: fmt.Sprintf("inventory.files[%d]", i), Msg: fmt.Sprintf("must be an absolute path, got %q", p)}
		}
	}
	if err := c.Inventory.EC2.validate(root); err != nil {
		return err
	}
	if c.Outputs.ASFFFile != "" && !filepath.IsAbs(c.Outputs.ASFFFile) {
		return bad("outputs.asff_file", "must be an absolute path, got %q", c.Outputs.ASFFFile)
	}
	if c.Outputs.MetricsFile != "" && !filepath.IsAbs(c.Outputs.MetricsFile) {
		return bad("outputs.metrics_file", "must be an absolute path, got %q", c.Outputs.MetricsFile)
	}
	if e := c.Outputs.CloudWatch.Endpoint; e != "" {
		u, err := url.Parse(e)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return bad("outputs.cloudwatch.endpoint", "must be an http(s) URL, got %q", e)
		}
	}
	if c.Outputs.CloudWatch.Namespace == "" && (c.Outputs.CloudWatch.Region != "" || c.Outputs.CloudWatch.Endpoint != "") {
		return bad("outputs.cloudwatch.namespace", "must be set when outputs.cloudwatch is used")
	}
	if err := c.validateOutputs(root); err != nil {
		return err
	}
	if w := c.Outputs.Webhook; w.URL != "" {
		u, err := url.Parse(w.URL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return bad("outputs.webhook.url", "must be an http(s) URL, got %q", w.URL)
		}
	}
	if c.Outputs.Webhook.Retries < 0 || c.Outputs.Webhook.Retries > 100 {
		return bad("outputs.webhook.retries", "must be 0-100, got %d", c.Outputs.Webhook.Retries)
	}
	if c.Outputs.Webhook.Timeout <= 0 {
		return bad("outputs.webhook.timeout", "must be positive, got %s", c.Outputs.Webhook.Timeout)
	}
	if c.Outputs.Webhook.Backoff < 0 {
		return bad("outputs.webhook.backoff", "must not be negative, got %s", c.Outputs.Webhook.Backoff)
	}
	if c.Serve.Directory != "" && !filepath.IsAbs(c.Serve.Directory) {
		return bad("serve.directory", "must be an absolute path, got %q", c.Serve.Directory)
	}
	if c.Serve.Checkpoint != "" && !filepath.IsAbs(c.Serve.Checkpoint) {
		return bad("serve.checkpoint", "must be an absolute path, got %q", c.Serve.Checkpoint)
	}
	if c.Serve.PollInterval < 100*time.Millisecond {
		return bad("serve.poll_interval", "must be at least 100ms, got %s", c.Serve.PollInterval)
	}
	if e := c.Serve.S3.Endpoint; e != "" {
		u, err := url.Parse(e)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return bad("serve.s3.endpoint", "must be an http(s) URL, got %q", e)
		}
	}
	if c.Serve.S3.Bucket == "" && c.Serve.SQS.QueueURL == "" && (c.Serve.S3.Prefix != "" || c.Serve.S3.Endpoint != "") {
		return bad("serve.s3.bucket", "must be set when serve.s3 is used")
	}
	if q := c.Serve.SQS; q.QueueURL != "" {
		if u, err := url.Parse(q.QueueURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return bad("serve.sqs.queue_url", "must be the queue's https URL, got %q", q.QueueURL)
		}
		if c.Serve.S3.Bucket != "" {
			return bad("serve.s3.bucket", "and serve.sqs are two ways to find new files: choose one")
		}
		if q.VisibilityTimeout < time.Second || q.VisibilityTimeout > 12*time.Hour {
			return bad("serve.sqs.visibility_timeout", "must be between 1s and 12h, got %s", q.VisibilityTimeout)
		}
	} else if c.Serve.SQS.Endpoint != "" {
		return bad("serve.sqs.queue_url", "must be set when serve.sqs is used")
	}
	if e := c.Serve.SQS.Endpoint; e != "" {
		if u, err := url.Parse(e); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return bad("serve.sqs.endpoint", "must be an http(s) URL, got %q", e)
		}
	}
	if err := c.validateIntake(root); err != nil {
		return err
	}
	switch c.Store.Driver {
	case "sqlite":
		if c.Store.DSN != "" && !filepath.IsAbs(c.Store.DSN) {
			return bad("store.dsn", "must be an absolute path for sqlite, got %q", c.Store.DSN)
		}
		if c.Store.DSN != "" && c.Intake.Database != "" && c.Store.DSN != c.Intake.Database {
			return bad("store.dsn", "and intake.database name two SQLite files: set store.dsn only")
		}
	case "postgres":
		if c.Store.DSN == "" {
			return bad("store.dsn", "must be set for postgres")
		}
		if c.Intake.Database != "" {
			return bad("intake.database", "is the SQLite file: leave it out with store.driver postgres")
		}
	default:
		return bad("store.driver", "must be sqlite or postgres, got %q", c.Store.Driver)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return bad("log.level", "must be debug, info, warn or error, got %q", c.Log.Level)
	}
	if c.Log.Output != "stderr" && c.Log.Output != "stdout" && !filepath.IsAbs(c.Log.Output) {
		return bad("log.output", `must be "stderr", "stdout" or an absolute file path, got %q`, c.Log.Output)
	}
	return nil
}

func (c *Config) validateOutputs(root *yaml.Node) error {
	bad := func(key, format string, args ...any) error {
		return yamlfile.Errorf(root, key, format, args...)
	}
	o := c.Outputs
	if o.MetricsNamespace == "" || len(o.MetricsNamespace) > 255 {
		return bad("outputs.metrics_namespace", "must be 1-255 characters, got %q", o.MetricsNamespace)
	}
	if o.QueueSize < 1 || o.QueueSize > 100000 {
		return bad("outputs.queue_size", "must be 1-100000, got %d", o.QueueSize)
	}
	if o.ShutdownGrace < 0 {
		return bad("outputs.shutdown_grace", "must not be negative, got %s", o.ShutdownGrace)
	}
	for key, e := range map[string]string{"outputs.eventbridge.endpoint": o.EventBridge.Endpoint, "outputs.security_hub.endpoint": o.SecurityHub.Endpoint} {
		if e == "" {
			continue
		}
		if u, err := url.Parse(e); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return bad(key, "must be an http(s) URL, got %q", e)
		}
	}
	eb := o.EventBridge
	if eb.EventBus == "" && eb.Endpoint != "" {
		return bad("outputs.eventbridge.event_bus", "must be set when outputs.eventbridge is used (\"default\" for the default bus)")
	}
	if eb.Source == "" || strings.HasPrefix(eb.Source, "aws.") {
		return bad("outputs.eventbridge.source", "must be set and not start with \"aws.\" (AWS reserves it), got %q", eb.Source)
	}
	for key, r := range map[string]int{"outputs.eventbridge.retries": eb.Retries, "outputs.security_hub.retries": o.SecurityHub.Retries} {
		if r < 0 || r > 100 {
			return bad(key, "must be 0-100, got %d", r)
		}
	}
	for key, b := range map[string]time.Duration{"outputs.eventbridge.backoff": eb.Backoff, "outputs.security_hub.backoff": o.SecurityHub.Backoff} {
		if b < 0 {
			return bad(key, "must not be negative, got %s", b)
		}
	}
	if !o.SecurityHub.Enabled && o.SecurityHub.Endpoint != "" {
		return bad("outputs.security_hub.enabled", "must be true when outputs.security_hub is used")
	}
	return nil
}

func (c *Config) validateIntake(root *yaml.Node) error {
	bad := func(key, format string, args ...any) error {
		return yamlfile.Errorf(root, key, format, args...)
	}
	in := c.Intake
	if in.PurgeGrace < 0 {
		return bad("intake.purge_grace", "must not be negative, got %s", in.PurgeGrace)
	}
	if in.Listen == "" {
		if in.Database != "" || in.TLSCert != "" || in.TLSKey != "" || in.ClientCA != "" || len(in.AWSCertificates) > 0 || len(in.AllowedAccounts) > 0 || in.PlainHTTP {
			return bad("intake.listen", "must be set when intake is used")
		}
		return nil
	}
	host, port, err := net.SplitHostPort(in.Listen)
	if n, perr := strconv.Atoi(port); err != nil || perr != nil || n < 0 || n > 65535 {
		return bad("intake.listen", "must be host:port, got %q", in.Listen)
	}
	for key, p := range map[string]string{"intake.tls_cert": in.TLSCert, "intake.tls_key": in.TLSKey, "intake.client_ca": in.ClientCA, "intake.database": in.Database} {
		if p != "" && !filepath.IsAbs(p) {
			return bad(key, "must be an absolute path, got %q", p)
		}
	}
	if in.PlainHTTP {
		if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
			return bad("intake.plain_http", "only allowed on a loopback listen address, not %q", in.Listen)
		}
		if in.TLSCert != "" || in.TLSKey != "" || in.ClientCA != "" {
			return bad("intake.plain_http", "excludes tls_cert, tls_key and client_ca")
		}
	} else if in.TLSCert == "" || in.TLSKey == "" {
		return bad("intake.tls_cert", "intake.tls_cert and intake.tls_key must be set (or plain_http on loopback, for tests)")
	}
	for i, p := range in.AWSCertificates {
		if !filepath.IsAbs(p) {
			return &yamlfile.Error{Line: yamlfile.LineOf(root, fmt.Sprintf("%s[%d]", "intake.aws_certificates", i)), Key: fmt.Sprintf("intake.aws_certificates[%d]", i), Msg: fmt.Sprintf("must be an absolute path, got %q", p)}
		}
	}
	for i, a := range in.AllowedAccounts {
		if !IsAccountID(a) {
			return &yamlfile.Error{Line: yamlfile.LineOf(root, fmt.Sprintf("%s[%d]", "intake.allowed_accounts", i)), Key: fmt.Sprintf("intake.allowed_accounts[%d]", i), Msg: fmt.Sprintf("not a 12-digit account id: %q", a)}
		}
	}
	if len(in.AWSCertificates) == 0 && in.ClientCA == "" {
		return bad("intake.aws_certificates", "intake needs aws_certificates (instances) or client_ca (mTLS senders)")
	}
	if len(in.AWSCertificates) > 0 && len(in.AllowedAccounts) == 0 {
		return bad("intake.allowed_accounts", "must list the accounts whose instances may send")
	}
	if in.Database == "" && c.Store.DSN == "" {
		return bad("intake.database", "must be set when intake is used (or store.dsn)")
	}
	return nil
}

// IsAccountID reports whether s is a 12-digit AWS account id.
func IsAccountID(s string) bool {
	if len(s) != 12 {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// ParsePrefix accepts a CIDR or a bare address (a /32 or /128).
func ParsePrefix(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	return netip.Prefix{}, fmt.Errorf("not a CIDR or address: %q", s)
}

func prefixes(root *yaml.Node, key string, in []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(in))
	for i, s := range in {
		p, err := ParsePrefix(s)
		if err != nil {
			return nil, &yamlfile.Error{Line: yamlfile.LineOf(root, fmt.Sprintf("%s[%d]", key, i)), Key: fmt.Sprintf("%s[%d]", key, i), Msg: err.Error()}
		}
		out = append(out, p)
	}
	return out, nil
}

// String renders the effective configuration, for check-config.
func (c Config) String() string {
	out, err := yaml.Marshal(c)
	if err != nil {
		return fmt.Sprintf("marshal config: %v", err)
	}
	return string(out)
}

var (
	regionRE  = regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-\d+$`)
	roleARNRE = regexp.MustCompile(`^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$`)
)

func (e *EC2Inventory) validate(root *yaml.Node) error {
	item := func(list string, i int, format string, args ...any) error {
		key := fmt.Sprintf("inventory.ec2.%s[%d]", list, i)
		return &yamlfile.Error{Line: yamlfile.LineOf(root, key), Key: key, Msg: fmt.Sprintf(format, args...)}
	}
	for i, r := range e.Regions {
		if !regionRE.MatchString(r) {
			return item("regions", i, "not a region: %q", r)
		}
	}
	for i, a := range e.RoleARNs {
		if !roleARNRE.MatchString(a) {
			return item("role_arns", i, "not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME): %q", a)
		}
	}
	if len(e.RoleARNs) > 0 && len(e.Regions) == 0 {
		return yamlfile.Errorf(root, "inventory.ec2.role_arns", "needs inventory.ec2.regions")
	}
	if e.Interval < time.Minute || e.Interval > 24*time.Hour {
		return yamlfile.Errorf(root, "inventory.ec2.interval", "must be 1m-24h, got %s", e.Interval)
	}
	return nil
}
