package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"

	"github.com/vishvananda/netlink"

	"github.com/imdsguard/imdsguard/internal/agent/broker"
	"github.com/imdsguard/imdsguard/internal/agent/capture"
	"github.com/imdsguard/imdsguard/internal/agent/events"
	"github.com/imdsguard/imdsguard/internal/agent/forwarder"
	"github.com/imdsguard/imdsguard/internal/agent/spool"
	"github.com/imdsguard/imdsguard/internal/wire"
)

// fingerprints records which process fetched which credential. Until the durable spool
// and forwarder exist, fingerprints go to a local JSON-lines file.
type fingerprints struct {
	capture *capture.Capturer
	meta    hostMeta
	mu      sync.Mutex
	f       *os.File     // local copy, nil when fingerprints.output is ""
	spool   *spool.Spool // nil when not forwarding
}

func (a *agent) openFingerprints() error {
	fc := a.cfg.Fingerprints
	if fc.Output == "" && fc.Correlator.URL == "" {
		return nil
	}
	secret, err := capture.HostSecret(filepath.Join(a.cfg.StateDir, "host.key"))
	if err != nil {
		return err
	}
	fps := &fingerprints{}
	fps.capture = capture.NewCapturer(secret, a.instance, func() []netip.Addr {
		_, public := fps.meta.get()
		return append(hostAddresses(), public...)
	})
	if fc.Output != "" {
		if err := os.MkdirAll(filepath.Dir(fc.Output), 0o700); err != nil {
			return fmt.Errorf("create fingerprints directory: %w", err)
		}
		if fps.f, err = os.OpenFile(fc.Output, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600); err != nil {
			return fmt.Errorf("open fingerprints output: %w", err)
		}
	}
	if fc.Correlator.URL != "" {
		if fps.spool, err = spool.Open(filepath.Join(a.cfg.StateDir, "spool"), fc.SpoolMaxBytes); err != nil {
			return err
		}
	}
	a.fps = fps
	return nil
}

// learnMeta starts learning the instance profile and public addresses for fingerprints.
func (a *agent) learnMeta(ctx context.Context) {
	if a.fps != nil {
		go learnHostMeta(ctx, a.tel.Identity.Client(), &a.fps.meta, a.log)
	}
}

// forward drains the spool to the correlator until ctx is done.
func (a *agent) forward(ctx context.Context) error {
	if a.fps == nil || a.fps.spool == nil {
		return nil
	}
	c := a.cfg.Fingerprints.Correlator
	f, err := forwarder.New(forwarder.Config{URL: c.URL, CAFile: c.CAFile, ClientCert: c.ClientCert, ClientKey: c.ClientKey},
		a.fps.spool, a.tel.Identity, a.log)
	if err != nil {
		return err
	}
	go func() { _ = f.Run(ctx) }() // returns when ctx is done; failures are logged and retried inside
	return nil
}

// instance is the host's EC2 identity, as far as the agent knows it yet.
func (a *agent) instance() wire.Instance {
	id, ok := a.tel.Identity.Get()
	if !ok {
		return wire.Instance{}
	}
	return wire.Instance{ID: id.InstanceID, AccountID: id.AccountID, Region: id.Region, AvailabilityZone: id.AvailabilityZone}
}

// hostAddresses lists every address of the host's interfaces: where a credential may
// legitimately be used from.
func hostAddresses() []netip.Addr {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range addrs {
		// Loopback and link-local (IMDS's own 169.254.169.254) never reach AWS APIs.
		if ip, ok := netip.AddrFromSlice(a.IP); ok && !ip.IsLoopback() && !ip.Unmap().IsLinkLocalUnicast() {
			out = append(out, ip.Unmap())
		}
	}
	return out
}

// recordCredential fingerprints a credential answer relayed by the broker. The body
// holds secrets: it is dropped here, and never logged.
func (a *agent) recordCredential(req broker.Request, rec events.Record) {
	if a.fps == nil || req.Body == nil {
		return
	}
	proc := wire.Process{PID: int(rec.PID), Exe: rec.Exe, User: rec.User, Unit: rec.Unit, ContainerID: rec.ContainerID,
		ContainerRuntime: rec.Container.Runtime}
	if p := rec.Container.Pod; p.Name != "" {
		proc.Pod = &wire.Pod{Namespace: p.Namespace, Name: p.Name, UID: p.UID, Container: p.Container, ServiceAccount: p.ServiceAccount}
	}
	if t := rec.Container.ECS; t.ARN != "" {
		proc.ECSTask = &wire.ECSTask{ARN: t.ARN, Family: t.Family, Container: t.Container}
	}
	endpoint := string(req.Endpoint)
	if endpoint == "" {
		endpoint = string(broker.EndpointIMDS)
	}
	fp, first, err := a.fps.capture.ObserveEndpoint(endpoint, broker.CanonicalPath(req.Path), req.Body, proc, req.Conn.StartBoottime, string(req.Version))
	if err != nil {
		a.log.Warn().Err(err).Str("event", "fingerprint_failed").Str("path", req.Path).Msg("credential answer not understood")
		return
	}
	if !first {
		return
	}
	fp.InstanceProfileARN, _ = a.fps.meta.get()
	line, err := json.Marshal(fp)
	if err != nil {
		return
	}
	a.fps.mu.Lock()
	if a.fps.spool != nil {
		// fsync'd before Append returns: nothing is lost between host and correlator.
		dropped, serr := a.fps.spool.Append(line)
		if dropped > 0 {
			a.log.Warn().Str("event", "spool_dropped").Uint64("fingerprints", dropped).
				Msg("spool full: oldest fingerprints dropped")
		}
		err = serr
	}
	if a.fps.f != nil && err == nil {
		if _, err = a.fps.f.Write(append(line, '\n')); err == nil {
			err = a.fps.f.Sync()
		}
	}
	a.fps.mu.Unlock()
	if err != nil {
		a.log.Error().Err(err).Str("event", "fingerprint_write_failed").Msg("writing fingerprint")
		return
	}
	a.log.Info().Str("event", "credential_fetched").Str("access_key_id", fp.AccessKeyID).Str("role", fp.Role).
		Uint32("pid", rec.PID).Str("exe", rec.Exe).Str("imds_version", fp.IMDSVersion).Str("endpoint", endpoint).Msg("fingerprint recorded")
}

func (f *fingerprints) Close() error {
	if f == nil {
		return nil
	}
	var errs []error
	if f.f != nil {
		errs = append(errs, f.f.Close())
	}
	if f.spool != nil {
		errs = append(errs, f.spool.Close())
	}
	return errors.Join(errs...)
}
