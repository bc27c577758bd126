package agent

import (
	"fmt"
	"reflect"

	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/policy"
)

type policyState struct {
	current policy.Policy
	loaded  bool
}

// applyPolicy resolves the allowlist against the host and writes it to the kernel when
// it changed (or force). Resolution is repeated on a timer: an upgraded binary has a new
// inode, a restarted unit a new cgroup.
func (a *agent) applyPolicy(force bool) error {
	p := policy.Resolve(a.cfg, a.cgroupRoot, a.containers)
	p.Kernel.AgentTGID = a.agentTGID()
	p.Kernel.HostNetns = a.netns
	if a.broker != nil {
		p.Kernel.BrokerPort = uint16(a.cfg.Broker.Port)
		p.Kernel.BrokerIPv4, p.Kernel.BrokerIPv6 = a.broker.Families()
	}
	a.mu.Lock()
	unchanged := a.policy.loaded && policy.Equal(a.policy.current, p)
	a.mu.Unlock()
	if unchanged && !force {
		return nil
	}
	if err := a.h.SetPolicy(p.Kernel); err != nil {
		return err
	}
	a.mu.Lock()
	a.policy = policyState{current: p, loaded: true}
	a.mu.Unlock()
	ev := a.log.Info()
	if len(p.Unresolved) > 0 {
		ev = a.log.Warn().Strs("unresolved", p.Unresolved)
	}
	ev.Str("event", "policy_applied").Str("mode", string(a.cfg.Mode)).Str("default_action", string(a.cfg.DefaultAction)).
		Int("rules", len(p.Names)).Msg("allowlist written to the kernel")
	return nil
}

func (a *agent) ruleName(i int) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.policy.current.RuleName(i)
}

// reload re-reads the configuration. Only the policy (mode, failure mode, default,
// rules) changes at run time; a change to anything else needs a restart, and says so.
func (a *agent) reload() error {
	if a.opts.Reload == nil {
		return fmt.Errorf("reload: agent started without a config file")
	}
	cfg, err := a.opts.Reload()
	if err != nil {
		a.log.Error().Err(err).Str("event", "reload_failed").Msg("configuration refused, keeping the running one")
		return err
	}
	if changed := restartOnly(a.cfg, cfg); len(changed) > 0 {
		a.log.Warn().Str("event", "reload_needs_restart").Strs("keys", changed).
			Msg("these keys take effect at the next start")
	}
	prev := a.cfg
	a.cfg.Mode, a.cfg.FailureMode, a.cfg.DefaultAction, a.cfg.Rules = cfg.Mode, cfg.FailureMode, cfg.DefaultAction, cfg.Rules
	if err := a.applyPolicy(true); err != nil {
		a.cfg = prev
		a.log.Error().Err(err).Str("event", "reload_failed").Msg("kernel refused the policy, keeping the running one")
		return err
	}
	if a.broker != nil {
		a.broker.SetEnforce(a.cfg.Mode.Enforcing())
	}
	a.log.Info().Str("event", "reloaded").Msg("configuration reloaded")
	return nil
}

func restartOnly(old, new config.Config) []string {
	var keys []string
	check := func(key string, changed bool) {
		if changed {
			keys = append(keys, key)
		}
	}
	check("cgroup", old.Cgroup != new.Cgroup)
	check("imds", old.IMDS.Addr4 != new.IMDS.Addr4 || old.IMDS.Addr6 != new.IMDS.Addr6 || old.IMDS.Port != new.IMDS.Port)
	check("events", old.Events != new.Events)
	check("pin_path", old.PinPath != new.PinPath)
	check("broker", old.Broker != new.Broker)
	check("endpoints", !reflect.DeepEqual(old.GuardedAddrs(), new.GuardedAddrs()))
	check("containers", old.Containers != new.Containers)
	check("control_socket", old.ControlSocket != new.ControlSocket)
	check("log", old.Log != new.Log)
	return keys
}
