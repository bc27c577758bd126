package agent

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"

	"github.com/vishvananda/netlink"

	"github.com/imdsguard/imdsguard/internal/broker"
	"github.com/imdsguard/imdsguard/internal/eventlog"
	"github.com/imdsguard/imdsguard/internal/fingerprint"
)

// fingerprints records which process fetched which credential. Until the durable spool
// and forwarder exist, fingerprints go to a local JSON-lines file.
type fingerprints struct {
	capture *fingerprint.Capturer
	mu      sync.Mutex
	f       *os.File
}

func (a *agent) openFingerprints() error {
	if a.cfg.Fingerprints.Output == "" {
		return nil
	}
	secret, err := fingerprint.HostSecret(filepath.Join(a.cfg.StateDir, "host.key"))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(a.cfg.Fingerprints.Output), 0o700); err != nil {
		return fmt.Errorf("create fingerprints directory: %w", err)
	}
	f, err := os.OpenFile(a.cfg.Fingerprints.Output, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("open fingerprints output: %w", err)
	}
	a.fps = &fingerprints{capture: fingerprint.NewCapturer(secret, a.instance, hostAddresses), f: f}
	return nil
}

// instance is the host's EC2 identity, as far as the agent knows it.
func (a *agent) instance() fingerprint.Instance { return fingerprint.Instance{} }

// hostAddresses lists every address of the host's interfaces: where a credential may
// legitimately be used from.
func hostAddresses() []netip.Addr {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && !ip.IsLoopback() {
			out = append(out, ip.Unmap())
		}
	}
	return out
}

// recordCredential fingerprints a credential answer relayed by the broker. The body
// holds secrets: it is dropped here, and never logged.
func (a *agent) recordCredential(req broker.Request, rec eventlog.Record) {
	if a.fps == nil || req.Body == nil {
		return
	}
	proc := fingerprint.Process{PID: int(rec.PID), Exe: rec.Exe, User: rec.User, Unit: rec.Unit, ContainerID: rec.ContainerID}
	fp, first, err := a.fps.capture.Observe(req.Path, req.Body, proc, req.Conn.StartBoottime, string(req.Version))
	if err != nil {
		a.log.Warn().Err(err).Str("event", "fingerprint_failed").Str("path", req.Path).Msg("credential answer not understood")
		return
	}
	if !first {
		return
	}
	line, err := json.Marshal(fp)
	if err != nil {
		return
	}
	a.fps.mu.Lock()
	_, err = a.fps.f.Write(append(line, '\n'))
	if err == nil {
		err = a.fps.f.Sync() // a fingerprint is evidence: on disk before we move on
	}
	a.fps.mu.Unlock()
	if err != nil {
		a.log.Error().Err(err).Str("event", "fingerprint_write_failed").Msg("writing fingerprint")
		return
	}
	a.log.Info().Str("event", "credential_fetched").Str("access_key_id", fp.AccessKeyID).Str("role", fp.Role).
		Uint32("pid", rec.PID).Str("exe", rec.Exe).Str("imds_version", fp.IMDSVersion).Msg("fingerprint recorded")
}

func (f *fingerprints) Close() error {
	if f == nil {
		return nil
	}
	return f.f.Close()
}
