package agent

import (
	"github.com/imdsguard/imdsguard/internal/agent/broker"
	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
	"github.com/imdsguard/imdsguard/internal/agent/procinfo"
)

// brokerEndpoints are the configured endpoints other than IMDS, for the broker (IMDS's
// addresses it takes from the imds keys).
func brokerEndpoints(eps []config.Endpoint) []broker.Endpoint {
	var out []broker.Endpoint
	for _, e := range eps {
		if e.Kind == config.EndpointIMDS {
			continue
		}
		out = append(out, broker.Endpoint{Kind: broker.EndpointKind(e.Kind), Addrs: e.Addrs, Port: e.Port})
	}
	return out
}

// credentialsOwner tells whether an ECS credentials id was handed to a task other than
// the requesting process's. The ids come from what the runtimes wrote of each container
// (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI in its configured environment), never from the
// process, which could rewrite its own environment. Foreign: the id is another known
// task's, or the requester's task was handed a different one. An id no known container
// was handed, asked for by a process of no known task, is not judged.
func (a *agent) credentialsOwner(conn hook.Redirect, id string) (string, bool) {
	if a.containers == nil || a.resolver == nil {
		return "", false
	}
	info := a.resolver.Resolve(procinfo.Process{PID: conn.PID, StartBoottime: conn.StartBoottime, UID: conn.UID,
		CgroupID: conn.CgroupID, ExeDev: conn.ExeDev, ExeIno: conn.ExeIno})
	own := info.Container.ECS
	if own.CredentialsID == id {
		return own.ARN, false
	}
	if owner, ok := a.containers.ECSTaskOfCredentials(id); ok {
		if own.ARN != "" && owner.ARN == own.ARN {
			return owner.ARN, false // another container of the same task
		}
		return owner.ARN, true
	}
	if own.CredentialsID != "" {
		return "unknown", true // not the id this task was handed
	}
	return "", false
}
