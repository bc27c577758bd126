package containers

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// ecsClient asks the ECS agent's introspection API which task a Docker container
// belongs to (GET /v1/tasks?dockerid=ID). Hosts without an ECS agent refuse the
// connection at once; after that the API is left alone for a while.
type ecsClient struct {
	base string
	http *http.Client

	mu        sync.Mutex
	downUntil time.Time
}

// ecsBackoff is how long an unreachable ECS agent is not asked again.
const ecsBackoff = 30 * time.Second

func newECSClient(base string) *ecsClient {
	return &ecsClient{base: strings.TrimSuffix(base, "/"), http: &http.Client{Timeout: time.Second}}
}

// ecsTask is the introspection API's task (the fields imdsguard reads).
type ecsTask struct {
	Arn        string `json:"Arn"`
	Family     string `json:"Family"`
	Containers []struct {
		DockerID string `json:"DockerId"`
		Name     string `json:"Name"`
	} `json:"Containers"`
}

func (c *ecsClient) taskOf(dockerID string) (ECSTask, bool) {
	c.mu.Lock()
	down := time.Now().Before(c.downUntil)
	c.mu.Unlock()
	if down {
		return ECSTask{}, false
	}
	t, err := c.get(dockerID)
	if err != nil {
		if _, refused := err.(notFound); !refused {
			c.mu.Lock()
			c.downUntil = time.Now().Add(ecsBackoff)
			c.mu.Unlock()
		}
		return ECSTask{}, false
	}
	out := ECSTask{ARN: t.Arn, Family: t.Family}
	for _, ct := range t.Containers {
		if ct.DockerID == dockerID {
			out.Container = ct.Name
		}
	}
	return out, out.ARN != ""
}

// notFound is the agent's answer for a container that is not in a task.
type notFound struct{ status int }

func (e notFound) Error() string { return fmt.Sprintf("ecs agent: status %d", e.status) }

func (c *ecsClient) get(dockerID string) (ecsTask, error) {
	resp, err := c.http.Get(c.base + "/v1/tasks?dockerid=" + url.QueryEscape(dockerID))
	if err != nil {
		return ecsTask{}, fmt.Errorf("ask ecs agent: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusBadRequest {
		return ecsTask{}, notFound{resp.StatusCode}
	}
	if resp.StatusCode != http.StatusOK {
		return ecsTask{}, fmt.Errorf("ask ecs agent: status %d", resp.StatusCode)
	}
	var t ecsTask
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&t); err != nil {
		return ecsTask{}, fmt.Errorf("decode ecs agent task: %w", err)
	}
	return t, nil
}
