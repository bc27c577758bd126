// Package ec2poll keeps serve's inventory current from the EC2 API: every interval it
// lists the network interfaces, elastic IPs and VPC endpoints of each account in each
// region (a member account through the role it is given there, assumed with STS) and
// hands the whole listing on, to replace the one before. An account and region whose
// listing fails keeps its last good one, so that an API error does not unplace
// instances.
package ec2poll

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials/stscreds"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/aws/aws-sdk-go-v2/service/sts"
	"github.com/rs/zerolog"

	"github.com/imdsguard/imdsguard/internal/correlator/inventory"
)

// SessionName is the role session name of the poller's assumed roles, as CloudTrail
// shows it in the member accounts.
const SessionName = "imdsguard-correlator-inventory"

// Poller lists what the EC2 API says about where instances are.
type Poller struct {
	Regions []string
	// RoleARNs are the roles to assume, one per member account; none polls the account
	// of AWS's credentials.
	RoleARNs []string
	Interval time.Duration
	// AWS is the base configuration: its credentials poll the own account and assume
	// the roles.
	AWS aws.Config
	// EC2Endpoint and STSEndpoint replace AWS's endpoints when set (tests, VPC endpoints).
	EC2Endpoint, STSEndpoint string
	Log                      zerolog.Logger

	targets []*target
	polled  bool
}

// target is one account (own, or a role) in one region.
type target struct {
	role, region string
	client       *ec2.Client
	last         *inventory.Inventory // the last good listing
}

func (t *target) String() string {
	if t.role == "" {
		return "own account in " + t.region
	}
	return t.role + " in " + t.region
}

func (p *Poller) setup() {
	if p.targets != nil {
		return
	}
	roles := p.RoleARNs
	if len(roles) == 0 {
		roles = []string{""}
	}
	base := p.AWS.Copy()
	if base.Region == "" && len(p.Regions) > 0 {
		base.Region = p.Regions[0] // STS's regional endpoint
	}
	stsClient := sts.NewFromConfig(base, func(o *sts.Options) {
		if p.STSEndpoint != "" {
			o.BaseEndpoint = aws.String(p.STSEndpoint)
		}
	})
	for _, role := range roles {
		creds := base.Credentials
		if role != "" {
			// One cache per role: the role's credentials are reused until they near
			// their expiry, across rounds.
			creds = aws.NewCredentialsCache(stscreds.NewAssumeRoleProvider(stsClient, role, func(o *stscreds.AssumeRoleOptions) {
				o.RoleSessionName = SessionName
			}))
		}
		for _, region := range p.Regions {
			cfg := base.Copy()
			cfg.Region, cfg.Credentials = region, creds
			client := ec2.NewFromConfig(cfg, func(o *ec2.Options) {
				if p.EC2Endpoint != "" {
					o.BaseEndpoint = aws.String(p.EC2Endpoint)
				}
			})
			p.targets = append(p.targets, &target{role: role, region: region, client: client})
		}
	}
}

// Poll lists every account in every region once and returns the whole; the error
// names what could not be listed (its last good listing is in the whole).
func (p *Poller) Poll(ctx context.Context) (*inventory.Inventory, error) {
	p.setup()
	p.polled = true
	whole := &inventory.Inventory{}
	var errs []error
	for _, t := range p.targets {
		inv, err := list(ctx, t.client)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", t, err))
		} else {
			t.last = inv
		}
		if t.last != nil {
			whole.Merge(t.last)
		}
	}
	return whole, errors.Join(errs...)
}

// Run polls every Interval until ctx ends (at once, unless Poll or Round was called before),
// giving each round's whole to publish. Errors are logged; they never stop it.
func (p *Poller) Run(ctx context.Context, publish func(*inventory.Inventory)) {
	interval := p.Interval
	if interval <= 0 {
		interval = 15 * time.Minute
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	if p.polled {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
	for {
		inv := p.Round(ctx)
		if ctx.Err() != nil {
			return
		}
		publish(inv)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Round polls once and logs what was found and what could not be listed.
func (p *Poller) Round(ctx context.Context) *inventory.Inventory {
	start := time.Now()
	inv, err := p.Poll(ctx)
	if err != nil {
		p.Log.Warn().Str("event", "inventory_poll_failed").Err(err).Msg("EC2 inventory: some accounts or regions could not be listed; their last listing is kept")
	}
	p.Log.Info().Str("event", "inventory_polled").Int("addresses", len(inv.Addresses)).Int("vpc_endpoints", len(inv.Endpoints)).
		Int("elastic_ips", len(inv.ElasticIPs)).Dur("took", time.Since(start)).Msg("EC2 inventory polled")
	return inv
}

// list asks one account in one region. The SDK's types carry the API's field names, the
// ones the AWS CLI prints, so the listing goes through the same parser as an
// --inventory file.
func list(ctx context.Context, c *ec2.Client) (*inventory.Inventory, error) {
	out := struct {
		NetworkInterfaces []types.NetworkInterface
		Addresses         []types.Address
		VpcEndpoints      []types.VpcEndpoint
	}{NetworkInterfaces: []types.NetworkInterface{}, Addresses: []types.Address{}, VpcEndpoints: []types.VpcEndpoint{}}
	nis := ec2.NewDescribeNetworkInterfacesPaginator(c, &ec2.DescribeNetworkInterfacesInput{})
	for nis.HasMorePages() {
		page, err := nis.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("DescribeNetworkInterfaces: %w", err)
		}
		out.NetworkInterfaces = append(out.NetworkInterfaces, page.NetworkInterfaces...)
	}
	addrs, err := c.DescribeAddresses(ctx, &ec2.DescribeAddressesInput{})
	if err != nil {
		return nil, fmt.Errorf("DescribeAddresses: %w", err)
	}
	out.Addresses = append(out.Addresses, addrs.Addresses...)
	eps := ec2.NewDescribeVpcEndpointsPaginator(c, &ec2.DescribeVpcEndpointsInput{})
	for eps.HasMorePages() {
		page, err := eps.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("DescribeVpcEndpoints: %w", err)
		}
		out.VpcEndpoints = append(out.VpcEndpoints, page.VpcEndpoints...)
	}
	data, err := json.Marshal(out)
	if err != nil {
		return nil, fmt.Errorf("encode listing: %w", err)
	}
	inv, err := inventory.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("listing: %w", err)
	}
	return inv, nil
}
