// Package policy turns the allowlist in the configuration into what the kernel can
// check: user and group names into ids, executable paths into device+inode, units,
// cgroup paths, container ids and what container runtimes know of their containers
// (Kubernetes pod, namespace and service account, ECS task family) into cgroup ids.
//
// An executable is matched by the file, never by its name: a renamed copy is another
// file and does not match, while `comm` tricks change nothing. Resolution is repeated
// (Resolve is cheap) so that an upgraded package (new inode), a restarted unit (new
// cgroup) or a new container keeps matching.
package policy

import (
	"fmt"
	"io/fs"
	"os/user"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/imdsguard/imdsguard/internal/agent/config"
	"github.com/imdsguard/imdsguard/internal/agent/containers"
	"github.com/imdsguard/imdsguard/internal/agent/hook"
)

// Policy is a resolved allowlist: what the kernel gets, and the rule names to explain
// its verdicts with.
type Policy struct {
	Kernel hook.KernelPolicy
	Names  []string // rule names by index
	// Unresolved lists criteria that matched nothing on this host right now (a user
	// that does not exist, an executable not installed): their rules cannot match.
	Unresolved []string
}

// RuleName returns the name of rule i, "" for -1 (the default action).
func (p *Policy) RuleName(i int) string {
	if i < 0 || i >= len(p.Names) {
		return ""
	}
	return p.Names[i]
}

// Resolve resolves cfg's rules against this host. cgroupRoot is the cgroup2 mount;
// meta reads the container runtimes' state (nil: rules on pods and tasks match nothing).
func Resolve(cfg config.Config, cgroupRoot string, meta *containers.Resolver) Policy {
	p := Policy{Kernel: hook.KernelPolicy{
		DefaultAllow: cfg.DefaultAction.Allows(),
		Enforce:      cfg.Mode.Enforcing(),
		FailClosed:   cfg.FailureMode == config.FailClosed,
		EventsUDP:    cfg.Events.UDP,
	}}
	var tree cgroupTree
	needTree := false
	for _, r := range cfg.Rules {
		if r.Unit != "" || r.ContainerCriteria() {
			needTree = true
		}
	}
	if needTree {
		tree = walkCgroups(cgroupRoot)
		if meta != nil {
			meta.Forget(tree.containers()) // the cache follows the host's containers
		}
	}
	for i, r := range cfg.Rules {
		kr := hook.KernelRule{Allow: r.Action.Allows(), V2Required: r.IMDSv2.Required()}
		miss := func(what string) {
			p.Unresolved = append(p.Unresolved, fmt.Sprintf("rules[%d] (%s): %s", i, r.Name, what))
		}
		switch {
		case r.User != "":
			kr.HasUID = true
			if uid, err := lookupUser(r.User); err == nil {
				kr.UIDs = []uint32{uid}
			} else {
				miss("user " + r.User + " does not exist")
			}
		case r.UID != nil:
			kr.HasUID, kr.UIDs = true, []uint32{uint32(*r.UID)}
		}
		switch {
		case r.Group != "":
			kr.HasGID = true
			if gid, err := lookupGroup(r.Group); err == nil {
				kr.GIDs = []uint32{gid}
			} else {
				miss("group " + r.Group + " does not exist")
			}
		case r.GID != nil:
			kr.HasGID, kr.GIDs = true, []uint32{uint32(*r.GID)}
		}
		if r.Exe != "" {
			kr.HasExe = true
			var st syscall.Stat_t
			if err := syscall.Stat(r.Exe, &st); err == nil {
				kr.Exes = []hook.ExeID{{Dev: st.Dev, Ino: st.Ino}}
				if interp, ok := config.ScriptInterpreter(r.Exe); ok {
					miss("exe " + r.Exe + " is a script (#!" + interp + "): processes running it have the interpreter as their exe, so this rule never matches them")
				}
			} else {
				miss("exe " + r.Exe + ": " + err.Error())
			}
		}
		switch {
		case r.Cgroup != "":
			kr.HasCgroup = true
			dir := r.Cgroup
			if !strings.HasPrefix(dir, cgroupRoot+"/") {
				dir = filepath.Join(cgroupRoot, dir)
			}
			if id, err := inode(dir); err == nil {
				kr.Cgroups = []uint64{id}
			} else {
				miss("cgroup " + r.Cgroup + " does not exist")
			}
		case r.Unit != "":
			kr.HasCgroup = true
			kr.Cgroups = tree.match(func(rel string) bool { return isUnitCgroup(rel, r.Unit) })
			if len(kr.Cgroups) == 0 {
				miss("unit " + r.Unit + " has no cgroup (not running)")
			}
		case r.ContainerCriteria():
			kr.HasCgroup = true
			kr.Cgroups = tree.match(func(rel string) bool { return containerMatches(r, rel, meta) })
			if len(kr.Cgroups) == 0 {
				miss(containerCriteria(r) + " has no cgroup (no such container running)")
			}
		}
		p.Kernel.Rules = append(p.Kernel.Rules, kr)
		p.Names = append(p.Names, r.Name)
	}
	return p
}

// Equal reports whether two resolutions give the kernel the same policy.
func Equal(a, b Policy) bool {
	// Every field of the kernel policy counts, including ones added later: a field-by-
	// field comparison once missed the broker port, the mark and the host namespace.
	return reflect.DeepEqual(a.Kernel, b.Kernel) && slices.Equal(a.Names, b.Names)
}

func lookupUser(name string) (uint32, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return 0, err
	}
	id, err := strconv.ParseUint(u.Uid, 10, 32)
	return uint32(id), err
}

func lookupGroup(name string) (uint32, error) {
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	id, err := strconv.ParseUint(g.Gid, 10, 32)
	return uint32(id), err
}

func inode(path string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

type cgroupDir struct {
	rel string
	id  uint64
}

type cgroupTree []cgroupDir

// walkCgroups lists the cgroups below root that the system owns. A directory owned by
// another user than root's owner is a delegated subtree (a user's systemd manager, a
// rootless container runtime): its owner can create any name in it, so neither it nor
// anything below it is listed, and no unit or container rule can match it.
func walkCgroups(root string) cgroupTree {
	var out cgroupTree
	var rootSt syscall.Stat_t
	if err := syscall.Stat(root, &rootSt); err != nil {
		return nil
	}
	_ = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil {
			return nil
		}
		if st.Uid != rootSt.Uid {
			return filepath.SkipDir // delegated: not the system's
		}
		out = append(out, cgroupDir{rel: strings.TrimPrefix(path, root), id: st.Ino})
		return nil
	})
	return out
}

// isUnitCgroup says whether rel (below the cgroup root, leading "/") is the control
// group systemd gives unit: the unit's name under a chain of slices only
// (/system.slice/NAME, /system.slice/app.slice/NAME, /user.slice/user-1000.slice/NAME),
// never a cgroup of that name anywhere else, such as inside another unit.
func isUnitCgroup(rel, unit string) bool {
	parts := strings.Split(strings.TrimPrefix(rel, "/"), "/")
	if len(parts) < 2 || parts[len(parts)-1] != unit {
		return false
	}
	for _, p := range parts[:len(parts)-1] {
		if !strings.HasSuffix(p, ".slice") {
			return false
		}
	}
	return true
}

// runtimeContainerID returns the full container id of the cgroup at rel when a
// container runtime made it at its own place, "" otherwise: a cgroup that merely has a
// container-like name (docker-0123456789abcdef.scope) names no container.
func runtimeContainerID(rel string) string {
	id, _ := containers.FromCgroup(rel)
	return id
}

// containerMatches says whether the cgroup at rel is a container that satisfies all of
// r's container criteria. Pods and tasks are known only from the runtimes' state: a
// container whose state cannot be read matches no such criterion.
func containerMatches(r config.Rule, rel string, meta *containers.Resolver) bool {
	id, runtime := containers.FromCgroup(rel)
	if id == "" || !strings.HasPrefix(id, r.Container) {
		return false
	}
	if r.PodNamespace == "" && r.Pod == "" && r.ServiceAccount == "" && r.ECSTaskFamily == "" {
		return true
	}
	if meta == nil {
		return false
	}
	info, ok := meta.Lookup(id, runtime)
	if !ok {
		return false
	}
	want := func(criterion, value string) bool { return criterion == "" || criterion == value }
	return want(r.PodNamespace, info.Pod.Namespace) && want(r.Pod, info.Pod.Name) &&
		want(r.ServiceAccount, info.Pod.ServiceAccount) && want(r.ECSTaskFamily, info.ECS.Family)
}

// containerCriteria names r's container criteria, for the unresolved list.
func containerCriteria(r config.Rule) string {
	var parts []string
	for _, c := range []struct{ key, value string }{{"container", r.Container}, {"pod_namespace", r.PodNamespace},
		{"pod", r.Pod}, {"service_account", r.ServiceAccount}, {"ecs_task_family", r.ECSTaskFamily}} {
		if c.value != "" {
			parts = append(parts, c.key+" "+c.value)
		}
	}
	return strings.Join(parts, ", ")
}

// containers returns the ids of the containers in the tree.
func (t cgroupTree) containers() map[string]bool {
	live := map[string]bool{}
	for _, d := range t {
		if id := runtimeContainerID(d.rel); id != "" {
			live[id] = true
		}
	}
	return live
}

// match returns the ids of the topmost cgroups whose path (below the root) matches:
// descendants are covered by the kernel's ancestor check.
func (t cgroupTree) match(ok func(rel string) bool) []uint64 {
	var ids []uint64
	var tops []string
	for _, d := range t {
		if !ok(d.rel) {
			continue
		}
		covered := false
		for _, top := range tops {
			if strings.HasPrefix(d.rel, top+"/") {
				covered = true
				break
			}
		}
		if !covered {
			tops = append(tops, d.rel)
			ids = append(ids, d.id)
		}
	}
	return ids
}
