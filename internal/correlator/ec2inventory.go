package correlator

import (
	"context"
	"fmt"

	awsconfig "github.com/aws/aws-sdk-go-v2/config"

	"github.com/imdsguard/imdsguard/internal/correlator/inventory"
	"github.com/imdsguard/imdsguard/internal/correlator/inventory/ec2poll"
)

// inventoryPoller is serve's component that keeps the detector's inventory current from
// the EC2 API (inventory.ec2). Detection takes each round between its own cycles: the
// detector is not safe for concurrent use.
type inventoryPoller struct {
	p *ec2poll.Poller
	// latest holds the newest round detection has not taken yet.
	latest chan *inventory.Inventory
}

// newInventoryPoller builds the poller and polls once, so that detection's first
// cycle already knows where the instances are. AWS credentials and endpoints come from
// the SDK's default chain (AWS_ENDPOINT_URL_EC2 and AWS_ENDPOINT_URL_STS included).
func newInventoryPoller(ctx context.Context, e *env) (*inventoryPoller, error) {
	c := e.cfg.Inventory.EC2
	awsCfg, err := awsconfig.LoadDefaultConfig(ctx, awsconfig.WithRegion(c.Regions[0]))
	if err != nil {
		return nil, fmt.Errorf("load aws config: %w", err)
	}
	ip := &inventoryPoller{
		p:      &ec2poll.Poller{Regions: c.Regions, RoleARNs: c.RoleARNs, Interval: c.Interval, AWS: awsCfg, Log: e.log},
		latest: make(chan *inventory.Inventory, 1),
	}
	ip.publish(ip.p.Round(ctx))
	return ip, nil
}

// Name implements component.
func (ip *inventoryPoller) Name() string { return "inventory" }

// Run implements component: a round every inventory.ec2.interval.
func (ip *inventoryPoller) Run(ctx context.Context) error {
	ip.p.Run(ctx, ip.publish)
	return nil
}

// publish replaces the round detection has not taken yet, if any (Run is the only
// sender, so the send never waits).
func (ip *inventoryPoller) publish(inv *inventory.Inventory) {
	select {
	case <-ip.latest:
	default:
	}
	ip.latest <- inv
}

// take returns the newest round not taken yet, nil when there is none (or no poller).
func (ip *inventoryPoller) take() *inventory.Inventory {
	if ip == nil {
		return nil
	}
	select {
	case inv := <-ip.latest:
		return inv
	default:
		return nil
	}
}

// applyInventory gives the detector the newest EC2 round with the inventory files.
func (d *detection) applyInventory() {
	inv := d.inventory.take()
	if inv == nil {
		return
	}
	whole := &inventory.Inventory{}
	whole.Merge(d.e.inv)
	whole.Merge(inv)
	d.det.SetInventory(whole)
}
