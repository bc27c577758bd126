package testbed

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/imdsguard/imdsguard/internal/testing/containercreds"
)

// setUpContainerView makes the bed ready for real containers (Options.ContainerView):
//
//   - a cgroup namespace rooted at the bed's cgroup, held by a sleeping process in it,
//     which the bed's agent joins (with a cgroup2 mount of its own): it sees the bed's
//     cgroup as the root, as an agent on a node sees the host's, so containers' cgroups
//     are at the places runtimes make them (/kubepods.slice/…, /ecs/…);
//   - runc's state directory, and the bed's containerd namespace for bundles;
//   - the ECS agent's introspection API (127.0.0.1:51678 in the bed's namespace).
func (b *Bed) setUpContainerView() error {
	b.containerView = true
	b.ecsTasks = map[string]ECSTask{}
	b.runcRoot = filepath.Join(b.Dir, "runc")
	bundles := filepath.Join(ContainerdTasks, b.Name)
	if err := os.MkdirAll(bundles, 0o755); err != nil {
		return fmt.Errorf("create bundle directory: %w", err)
	}
	b.closers = append(b.closers, func() error {
		// After every container (closed later-registered first): their cgroups' parents
		// in every hierarchy (runc makes them in the v1 ones too on hybrid hosts).
		return errors.Join(os.RemoveAll(bundles), RemoveCgroupEverywhere(b.Name))
	})
	fd, err := syscall.Open(b.Cgroup, syscall.O_DIRECTORY|syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open cgroup %s: %w", b.Cgroup, err)
	}
	cmd := exec.Command("unshare", "--cgroup", "sleep", "infinity")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, UseCgroupFD: true, CgroupFD: fd}
	waitErr, err := startPinned(cmd)
	syscall.Close(fd)
	if err != nil {
		return fmt.Errorf("start cgroup namespace holder: %w", err)
	}
	b.closers = append(b.closers, func() error { _ = cmd.Process.Kill(); <-waitErr; return nil })
	own, _ := os.Readlink("/proc/self/ns/cgroup")
	nsPath := "/proc/" + strconv.Itoa(cmd.Process.Pid) + "/ns/cgroup"
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(2 * time.Millisecond) {
		if ns, err := os.Readlink(nsPath); err == nil && ns != own {
			break
		}
		if time.Now().After(deadline) {
			return errors.New("cgroup namespace holder never unshared its cgroup namespace")
		}
	}
	b.cgroupnsPID = cmd.Process.Pid
	return b.serveInNetns("127.0.0.1:51678", http.HandlerFunc(b.serveECSIntrospection))
}

// serveECSIntrospection answers GET /v1/tasks?dockerid=ID as the ECS agent does.
func (b *Bed) serveECSIntrospection(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("dockerid")
	b.ecsMu.Lock()
	task, ok := b.ecsTasks[id]
	b.ecsMu.Unlock()
	if r.URL.Path != "/v1/tasks" || !ok {
		http.Error(w, `{"error":"not found"}`, http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"Arn": task.ARN(), "Family": task.Family, "Version": "1", "KnownStatus": "RUNNING", "DesiredStatus": "RUNNING",
		"Containers": []map[string]string{{"DockerId": id, "DockerName": "ecs-" + task.Family + "-" + task.Container, "Name": task.Container}},
	})
}

// serveInNetns serves h on addr inside the bed's network namespace until Close.
func (b *Bed) serveInNetns(addr string, h http.Handler) error {
	var ln net.Listener
	if err := InNetns(b.NetnsPath, func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		return fmt.Errorf("listen on %s in the bed: %w", addr, err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	b.closers = append(b.closers, func() error { return srv.Close() })
	return nil
}

// setUpCredentialEndpoints serves the ECS and Pod Identity stand-ins at their real
// addresses inside the bed (Options.CredentialEndpoints).
func (b *Bed) setUpCredentialEndpoints() error {
	for _, args := range [][]string{
		{"-n", b.Name, "addr", "add", ECSAddr.String() + "/32", "dev", "lo"},
		{"-n", b.Name, "addr", "add", PodIdentityV4.String() + "/32", "dev", "lo"},
		{"-n", b.Name, "-6", "addr", "add", PodIdentityV6.String() + "/128", "dev", "lo", "nodad"},
	} {
		if err := run("ip", args...); err != nil {
			return fmt.Errorf("add credential endpoint address: %w", err)
		}
	}
	b.ecs, b.podID = containercreds.NewECS(), containercreds.NewPodIdentity()
	for addr, h := range map[string]http.Handler{
		ECSAddr.String() + ":80":              b.ecs,
		PodIdentityV4.String() + ":80":        b.podID,
		"[" + PodIdentityV6.String() + "]:80": b.podID,
	} {
		if err := b.serveInNetns(addr, h); err != nil {
			return err
		}
	}
	return nil
}

// agentArgv is the command line that starts the agent binary bin inside the bed: in its
// network namespace and, with the container view, in the bed's cgroup namespace with a
// cgroup2 mount of its own over the host's (in a private mount namespace).
func (b *Bed) agentArgv(bin string, args ...string) []string {
	argv := []string{"nsenter", "--net=" + b.NetnsPath}
	if b.containerView {
		argv = append(argv, "--cgroup=/proc/"+strconv.Itoa(b.cgroupnsPID)+"/ns/cgroup", "--",
			"unshare", "--mount", "--propagation", "private", "--",
			"sh", "-c", `umount -l "$0" && mount -t cgroup2 cgroup2 "$0" && exec "$@"`, b.CgroupRoot)
	} else {
		argv = append(argv, "--")
	}
	return append(append(argv, bin), args...)
}

// agentCgroup is the cgroup the bed's agent guards, as the agent names it.
func (b *Bed) agentCgroup() string {
	if b.containerView {
		return b.CgroupRoot // the bed's cgroup, in the agent's cgroup namespace
	}
	return b.Cgroup
}

// reapBundles removes the bundle directories of beds of dead processes.
func reapBundles(dead func(string) bool) {
	entries, err := os.ReadDir(ContainerdTasks)
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.IsDir() && dead(e.Name()) {
			_ = os.RemoveAll(filepath.Join(ContainerdTasks, e.Name()))
		}
	}
}
