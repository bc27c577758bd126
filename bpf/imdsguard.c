// SPDX-License-Identifier: GPL-2.0
/* imdsguard's kernel side.
 *
 * connect4/connect6 run on every connect() in the guarded cgroup. A connect() that is not
 * to a guarded credential endpoint (IMDS, and the ECS and Pod Identity endpoints when
 * configured) returns after a few compares and touches no map. A connect() to one is
 * attributed to its process (one ring-buffer event), judged by the allowlist (deny =
 * ECONNREFUSED or EPERM, nothing leaves the host), and, when allowed and the agent is
 * alive, redirected to the agent's broker on loopback: the host's for the agent's own
 * network namespace, for another (a container's) the listener the agent made inside it,
 * when it published one (netns_brokers); else containers.fallback decides.
 *
 * The agent's own IMDS sockets are recognised by their socket cookies, which only the
 * agent writes into own_sockets (an unpinned map: only the agent holds its fd), checked
 * with the agent's tgid and network namespace; nothing a client can set (a mark, a port)
 * is trusted. They pass unjudged, with an event.
 *
 * sockops maps each connection to the broker, by its full 4-tuple and network namespace,
 * to its cookie, so the broker finds the connect-time record of each connection it
 * accepts and of no other. getpeername4/6 give the client back the address it asked for.
 *
 * egress drops packets to IMDS from sockets connect4/6 did not let through to it (raw
 * sockets, DNAT). exec and fork (BTF tracepoints) record the file each process exec'd,
 * which exe rules judge instead of the mm->exe_file a process can repoint.
 */
#include "types.h"
#include "bpf/bpf_helpers.h"
#include "bpf/bpf_endian.h"
#include "bpf/bpf_core_read.h"

char __license[] SEC("license") = "GPL";

#define TASK_COMM_LEN 16
#define EXE_DEPTH 16    /* path components of the executable recorded in the kernel */
#define EXE_WALK 24     /* loop bound: components plus mount crossings */
#define EXE_NAME_LEN 48 /* bytes per component, NUL included */
#define CGROUP_LEVELS 16 /* ancestors checked against cgroup rules */
#define MAX_RULES 64

enum verdict {
	VERDICT_ALLOW = 0,
	VERDICT_DENY = 1,
	VERDICT_AUDIT_DENY = 2,  /* audit mode: the policy denies, the kernel allowed */
	VERDICT_FAIL_OPEN = 3,   /* agent gone, failure_mode open: straight to IMDS */
	VERDICT_FAIL_CLOSED = 4, /* agent gone, failure_mode closed: EPERM */
};

/* Bits of event.flags and redirect.flags. */
enum flag {
	FLAG_REDIRECTED = 1,
	FLAG_V2_REQUIRED = 2,
	FLAG_AGENT = 4,     /* one of the agent's own sockets (own_sockets) */
	FLAG_NO_BROKER = 8, /* could not be brokered (other netns, UDP, no listener of ours) */
	FLAG_EXE_BORROWED = 16, /* mm->exe_file is not the file the process exec'd */
	FLAG_BACKSTOP = 32,     /* packets the egress backstop stopped (or, in audit, saw) */
};

/* Bits of policy.broker_families: the families whose loopback listener is the agent's. */
enum broker_family {
	BROKER_IPV4 = 1,
	BROKER_IPV6 = 2,
};

/* event.rule and redirect.rule when no rule matched (the default applied). */
enum rule {
	RULE_NONE = 0xff,
};

/* The guarded destinations (endpoints: IMDS first, then the ECS and Pod Identity
 * credential endpoints the configuration lists), set by the loader before load
 * (spec.Variables); network byte order. The first guarded_n4 (guarded_n6) entries are
 * used: the verifier knows these constants, so the compares of unused entries are dead
 * code, and a connect() to anything else costs a compare or two per entry. */
#define MAX_GUARDED 4
volatile const __u32 guarded_ip4[MAX_GUARDED] = {};
volatile const __u16 guarded_port4[MAX_GUARDED] = {};
volatile const __u32 guarded_ip6[MAX_GUARDED][4] = {};
volatile const __u16 guarded_port6[MAX_GUARDED] = {};
volatile const __u8 guarded_n4 = 0;
volatile const __u8 guarded_n6 = 0;
/* The same destinations as events and redirect records name them, by enum dst kind and
 * index: the address (IPv4 in the first word, the rest zero) and the port in host byte
 * order. Tables, so that recording a destination takes no branch (every branch there
 * doubles what the verifier walks after it). */
volatile const __u32 guarded_daddr[4][MAX_GUARDED][4] = {};
volatile const __u16 guarded_dport[4][MAX_GUARDED] = {};
/* 1: containers.fallback is deny: an allowed TCP connection from a network namespace
 * whose broker endpoint is not published is refused instead of let through direct. */
volatile const __u8 containers_deny = 0;
/* The broker's port, network byte order: lets sockops ignore other connections
 * without a map lookup. Fixed for the agent's life like the rest of the broker config. */
volatile const __u16 broker_port = 0;
/* 1: a denied connect() fails with ECONNREFUSED (bpf_set_retval, Linux 5.18+ for
 * cgroup sock_addr hooks), the way a connection nobody listens for fails, instead of
 * EPERM. The loader sets it when the kernel accepts the helper; at 0 the call is dead
 * code the verifier never walks, so the same object loads on older kernels. */
volatile const __u8 deny_refused = 0;
/* 1: judge the executable by the identity recorded at exec (exec_ids), where there is
 * one. The loader sets it when the kernel lets connect programs read task storage; at 0
 * that code is dead and never verified. */
volatile const __u8 exec_identity = 0;

#define ECONNREFUSED 111

/* ---- policy: two generations, the active one flipped atomically ---- */

struct policy {
	__u64 has_uid;     /* rules that have a uid criterion, one bit per rule */
	__u64 has_gid;
	__u64 has_exe;
	__u64 has_cgroup;
	__u64 allow;       /* rules whose action is allow */
	__u64 v2_required; /* rules that require IMDSv2 */
	__u64 host_netns;  /* netns cookie of the agent: only its namespace is redirected */
	__u32 nrules;
	__u32 agent_tgid;  /* the agent's tgid: with own_sockets, names its own sockets */
	__u16 broker_port; /* network byte order; 0 = no broker */
	__u8 default_allow;
	__u8 enforce;
	__u8 fail_closed;
	__u8 loaded;       /* 0 until the agent wrote a policy */
	__u8 broker_families; /* enum broker_family bits: listeners the agent holds */
	__u8 events_udp;   /* 1: a UDP connect()'s first event is written; 0: only counted */
};

struct id_key {
	__u32 gen;
	__u32 id;
};

struct exe_key {
	__u32 gen;
	__u32 dev; /* kernel encoding */
	__u64 ino;
};

struct cgroup_key {
	__u64 gen;
	__u64 id;
};

#define PINNED __uint(pinning, LIBBPF_PIN_BY_NAME)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct policy);
	PINNED;
} policies SEC(".maps");

/* Index 0: the active policy generation (0 or 1). Written by the agent after the new
 * generation is complete, so a connect() never sees half a policy. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	PINNED;
} active_gen SEC(".maps");

/* Index 0: CLOCK_MONOTONIC ns of the agent's last heartbeat. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	PINNED;
} heartbeat SEC(".maps");

#define HEARTBEAT_TIMEOUT_NS 1000000000LL
/* A clean stop writes a beat up to this far in the future (a grace period in which the
 * kernel keeps redirecting for the next agent); anything further is not believed. */
#define HEARTBEAT_MAX_AHEAD_NS 30000000000LL

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct id_key);
	__type(value, __u64);
	PINNED;
} rule_uids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct id_key);
	__type(value, __u64);
	PINNED;
} rule_gids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct exe_key);
	__type(value, __u64);
	PINNED;
} rule_exes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct cgroup_key);
	__type(value, __u64);
	PINNED;
} rule_cgroups SEC(".maps");

/* ---- attribution ---- */

struct event {
	__u64 ktime_ns;        /* CLOCK_MONOTONIC at connect() */
	__u64 start_boottime;  /* process (group leader) start, ns since boot: tells pid reuse apart */
	__u64 cgroup_id;
	__u64 netns_cookie;
	__u64 socket_cookie;
	__u64 exe_ino;
	__u32 exe_dev;         /* kernel encoding: major<<20 | minor */
	__u32 tgid;            /* host pid namespace */
	__u32 ppid;            /* parent's tgid at connect time */
	__u32 tid;
	__u32 uid;
	__u32 gid;
	__u16 family;          /* AF_INET or AF_INET6 as called */
	__u16 dport;           /* host byte order */
	__u8 daddr[16];        /* IPv4 in the first 4 bytes, else IPv6 */
	__u8 verdict;          /* enum verdict */
	__u8 exe_depth;        /* components filled in exe_names, leaf first */
	__u8 exe_truncated;    /* exe_names hold only the last components of the path */
	__u8 rule;             /* index of the first matching rule, RULE_NONE for the default */
	__u8 flags;            /* FLAG_* */
	__u8 _pad[7];
	char comm[TASK_COMM_LEN];
	char exe_names[EXE_DEPTH][EXE_NAME_LEN];
};

/* Events of connections that went through (allowed, audit-denied, fail-open, the
 * agent's own): the broker's request lines name their process from these, so no flood
 * of refused connects may take their room. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	/* 1 MiB: ~1.2k events of headroom, plenty for a reader that hands events on without
	 * blocking; the mapping counts twice in the agent's RSS, so size matters. */
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

/* Events of refused connects (deny, fail-closed) and of UDP: their own ring, so that a
 * flood of them fills this one and never events. Aggregation (below) keeps even a flood
 * to one event per process per flush. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 << 10);
} events_refused SEC(".maps");

/* Refused and UDP connects, per process and outcome. The first of a kind writes its
 * event and creates the entry; the rest only count in it. Each second the agent reads
 * the counts and writes one summary line with what was counted since; it removes an
 * entry that counted nothing for a second, so the next connect of that kind writes an
 * event again. A flood costs one event, then one line per process per second. */
struct agg_key {
	__u32 tgid;
	__u8 verdict;
	__u8 rule;
	__u8 flags;
	__u8 udp;
};

struct agg {
	__u64 count;          /* connects since the entry was made that wrote no event */
	__u64 first_ns;       /* CLOCK_MONOTONIC of the first of them (or of the entry) */
	__u64 last_ns;
	__u64 start_boottime; /* of the process: with tgid, names it */
	__u64 cgroup_id;
	__u64 netns_cookie;
	__u64 exe_ino;
	__u32 exe_dev;
	__u32 uid;
	__u32 gid;
	__u16 family;
	__u16 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct agg_key);
	__type(value, struct agg);
} aggregates SEC(".maps");

/* What the broker needs about a redirected connection, keyed by the client socket's
 * cookie. LRU: entries of closed sockets age out. */
struct redirect {
	__u64 start_boottime;
	__u64 cgroup_id;
	__u64 exe_ino;
	__u32 exe_dev;
	__u32 _pad0;
	__u32 tgid;
	__u32 tid;
	__u32 uid;
	__u32 gid;
	__u8 daddr[16];
	__u16 dport;  /* host byte order */
	__u16 family;
	__u8 rule;
	__u8 flags;
	__u8 verdict;
	__u8 _pad[5];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct redirect);
	PINNED;
} redirects SEC(".maps");

/* A connection to the broker as both ends see it: the client's address and port, the
 * broker's address, and the network namespace. IPv4 addresses are IPv4-mapped
 * (::ffff:a.b.c.d), as a dual-stack socket and Go's As16 both write them. */
struct conn_key {
	__u64 netns;
	__u8 client[16];
	__u8 server[16];
	__u16 client_port; /* host byte order */
	__u16 server_port; /* host byte order */
	__u32 _pad;
};

/* Every connection to the broker port made from the guarded cgroup → its socket cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct conn_key);
	__type(value, __u64);
	PINNED;
} broker_conns SEC(".maps");

/* The network namespaces (other than the agent's) where the agent's broker listens on
 * loopback at the broker's port → their enum broker_family bits. Written by the agent
 * once the listeners accept, removed before they close. Pinned so that the programs of
 * the agent before and the new agent's share it, and cleared when an agent opens it: a
 * new agent's listeners are not its predecessor's. While no agent beats, judge() applies
 * the failure mode before it looks here. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u8);
	PINNED;
} netns_brokers SEC(".maps");

/* ---- discovery: a new network namespace's first socket ----
 *
 * sock_create runs on every socket() in the guarded cgroup. Each process's first socket
 * in a network namespace other than the agent's (runc init's netlink socket, as it brings
 * the container's lo up, before the container's process runs) writes one
 * netns_seen_event, and the agent serves the namespace at once: a container that
 * connects as it starts finds its broker endpoint there. Per process, not per
 * namespace: the first socket of a new namespace is often made by a process that exits
 * at once (runc's intermediate stages), which the agent cannot enter; the agent drops
 * the events of a namespace it serves with one map look-up. netns_seen remembers the
 * (namespace, process) pairs already reported; not pinned, so a new agent hears of each
 * namespace again at its next socket(). */
volatile const __u64 host_netns_cookie = 0; /* 0: discovery off */

struct netns_seen_event {
	__u64 netns_cookie;
	__u64 start_boottime; /* of the process that made the socket */
	/* Its cgroup: the runtime's stages that make a namespace's first sockets exit at
	 * once, and the container's init, which the agent can enter, shares their cgroup. */
	__u64 cgroup_id;
	__u32 tgid;
	__u32 ppid;
};

struct netns_seen_key {
	__u64 netns;
	__u32 tgid;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct netns_seen_key);
	__type(value, __u8);
} netns_seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 10);
} netns_events SEC(".maps");

/* Cookies of the agent's own sockets to IMDS, written by the agent before it connects
 * them. Never pinned: only the agent that created it holds an fd, so no other process
 * (short of root with CAP_SYS_ADMIN, which can detach the guard anyway) can add to it.
 * Cookies are never reused; LRU ages out those of closed sockets. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u8);
} own_sockets SEC(".maps");

/* The executable each task was started from: device and inode of the file exec'd,
 * written at exec (tracepoint sched_process_exec) in the task that exec'd, which leads
 * its thread group from then on, and copied to every new process at fork
 * (sched_process_fork); a thread is judged by its group leader's. Unlike mm->exe_file, which a process may repoint at any file it can
 * open with prctl(PR_SET_MM_MAP) (in a user namespace, without privilege), nothing a
 * process can call changes it but another exec. Tasks that have run no exec since the
 * programs were attached, and were forked from such tasks, have no entry: connect falls
 * back to mm->exe_file for them. Pinned, so that a restart keeps what was recorded. */
struct exec_id {
	__u64 ino;
	__u32 dev; /* kernel encoding */
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct exec_id);
	PINNED;
} exec_ids SEC(".maps");

/* Sockets whose packets may reach IMDS: those connect4/6 let through to it directly (the
 * agent's own, allowed ones that are not brokered, audit and fail-open). Set only by the
 * connect programs; a socket that never passed them (raw, packet, a connect that
 * netfilter rewrote to IMDS) has no entry, or one with approved 0 and its owner, noted by
 * the egress backstop at its first packet. Pinned: connections outlive a restart. */
struct sk_verdict {
	__u8 approved;
	__u8 _pad[3];
	__u32 tgid;          /* backstop: the process that sent the first packet */
	__u64 start_boottime;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sk_verdict);
	PINNED;
} sk_verdicts SEC(".maps");

/* Counters read by user space; they keep counting while the agent is gone. */
enum stat {
	STAT_RINGBUF_FULL = 0,
	STAT_DENIED = 1,
	STAT_AUDIT_DENIED = 2,
	STAT_FAIL_OPEN = 3,
	STAT_FAIL_CLOSED = 4,
	STAT_REDIRECTED = 5,
	STAT_BACKSTOP_DROPPED = 6, /* packets to IMDS from sockets no connect() approved */
	STAT_BACKSTOP_AUDIT = 7,   /* the same in audit mode (or before a policy): let through */
	STAT_MAX = 8,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	PINNED;
} stats SEC(".maps");

/* Keeps these types in BTF for bpf2go's -type: user space takes their layouts and
 * values from here, never from a copy made by hand. */
const struct event *unused_event __attribute__((unused));
const struct policy *unused_policy __attribute__((unused));
const struct redirect *unused_redirect __attribute__((unused));
const struct conn_key *unused_conn_key __attribute__((unused));
const struct agg_key *unused_agg_key __attribute__((unused));
const struct agg *unused_agg __attribute__((unused));
const struct netns_seen_event *unused_netns_seen_event __attribute__((unused));
const enum broker_family *unused_broker_family __attribute__((unused));
const enum verdict *unused_verdict __attribute__((unused));
const enum stat *unused_stat __attribute__((unused));
const enum flag *unused_flag __attribute__((unused));
const enum rule *unused_rule __attribute__((unused));

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		(*v)++;
}

/* ---- the decision ----
 *
 * Verifier cost is load time, and the agent must be guarding within milliseconds of
 * starting (internal/hook's verifierBudget holds each program to its count). So the
 * work on an IMDS connect() lives in global functions, which the verifier checks once
 * each, on their own, instead of once for every path and state that reaches them: a
 * program costs the sum of its parts, not their product.
 *   judge()            the verdict; once per program, whichever address was called
 *   emit()             the event; once, however many verdicts lead to it
 *   exe_step()         one step of the executable's path walk; the loop around it is
 *                      a call and a test per step
 *   cgroup_rule_bits() one ancestor level's rule lookup, likewise
 * judge() and emit() take only scalars and the context (what any kernel accepts), so
 * each reads what it needs of the current task itself, and the destination travels as
 * an enum dst with the index of the guarded entry matched, from which the address and
 * port follow (guarded_daddr, guarded_dport). exe_step() takes pointers to the event and to its walk state
 * (global functions take pointers to memory from Linux 5.12; the agent needs 5.14).
 * Anything that would branch on every path (finding the first matching rule) is
 * computed without a branch.
 */

/* Which guarded address the client called: its kind in the low two bits, the index of
 * the entry in its table (guarded_ip4 or guarded_ip6) in the next two. */
enum dst {
	DST_IPV4 = 0,        /* guarded_ip4[i] on an AF_INET socket */
	DST_IPV6 = 1,        /* guarded_ip6[i] */
	DST_IPV4_MAPPED = 2, /* ::ffff:guarded_ip4[i]: IPv4 from a dual-stack AF_INET6 socket */
};
#define DST_KIND(dst) ((dst) & 3)
#define DST_INDEX(dst) (((dst) >> 2) & (MAX_GUARDED - 1))

/* judge()'s answer: deny (EPERM), let through as is, or redirect to the broker at the
 * port in the low 16 bits (network byte order). */
enum judgement {
	JUDGE_DENY = 0,
	JUDGE_PASS = 1,
	JUDGE_REDIRECT = 0x10000,
};

/* AF_INET for DST_IPV4, AF_INET6 for the others; without a branch. */
static __always_inline __u16 dst_family(__u32 dst)
{
	__u32 six = (dst | (dst >> 1)) & 1;
	return AF_INET + six * (AF_INET6 - AF_INET);
}

/* The port the client called, host byte order. */
static __always_inline __u16 dst_port(__u32 dst)
{
	return guarded_dport[DST_KIND(dst)][DST_INDEX(dst)];
}

/* The address as the client called it: IPv4 in the first 4 bytes, the rest zero. */
static __always_inline void dst_addr(__u8 daddr[16], __u32 dst)
{
	__u32 k = DST_KIND(dst), i = DST_INDEX(dst);
	__u32 ip[4] = {guarded_daddr[k][i][0], guarded_daddr[k][i][1], guarded_daddr[k][i][2], guarded_daddr[k][i][3]};
	__builtin_memcpy(daddr, ip, 16);
}

struct task_view {
	__u64 pid_tgid;
	__u64 uid_gid;
	__u64 cgroup_id;
	__u64 exe_ino;
	__u64 start_boottime;
	__u32 exe_dev;
	__u8 udp_events; /* the policy's events_udp */
	__u8 flags;      /* FLAG_EXE_BORROWED or 0 */
};

static __always_inline void read_task(struct task_view *t)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);

	t->pid_tgid = bpf_get_current_pid_tgid();
	t->uid_gid = bpf_get_current_uid_gid();
	t->cgroup_id = bpf_get_current_cgroup_id();
	t->start_boottime = BPF_CORE_READ(task, group_leader, start_boottime);
	t->exe_ino = 0;
	t->exe_dev = 0;
	t->udp_events = 0;
	t->flags = 0;
	__u64 ino = exe ? BPF_CORE_READ(exe, f_inode, i_ino) : 0;
	__u32 dev = exe ? BPF_CORE_READ(exe, f_inode, i_sb, s_dev) : 0;
	if (exec_identity) {
		/* The thread group leader's record: exec leaves the exec'ing task leading its
		 * group, and a thread made without fork's tracepoint (an io_uring worker, which
		 * connects for an async connect) has none of its own. */
		struct exec_id *id = bpf_task_storage_get(&exec_ids, bpf_get_current_task_btf()->group_leader, 0, 0);
		if (id) {
			t->exe_ino = id->ino;
			t->exe_dev = id->dev;
			if (id->ino != ino || id->dev != dev)
				t->flags = FLAG_EXE_BORROWED;
			return;
		}
	}
	t->exe_ino = ino;
	t->exe_dev = dev;
}

static __always_inline __u64 lookup_bits(void *map, void *key)
{
	__u64 *v = bpf_map_lookup_elem(map, key);
	return v ? *v : 0;
}

/* Index of the lowest set bit of a non-zero x (clang's BPF backend has no ctz): the
 * number of bits below it, counted without a branch, so the verifier walks it once. */
static __always_inline __u8 lowest_bit(__u64 x)
{
	__u64 y = (x & -x) - 1;
	y = y - ((y >> 1) & 0x5555555555555555ULL);
	y = (y & 0x3333333333333333ULL) + ((y >> 2) & 0x3333333333333333ULL);
	y = (y + (y >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
	return (y * 0x0101010101010101ULL) >> 56;
}

/* The rules that name cgroup id in policy generation gen. A global function, so that
 * the verifier checks the lookup once, not once per ancestor level. */
__noinline __u64 cgroup_rule_bits(__u32 gen, __u64 id)
{
	struct cgroup_key k = {.gen = gen, .id = id};
	return lookup_bits(&rule_cgroups, &k);
}

/* Returns the first matching rule's index, RULE_NONE when none matches. Rules are
 * conjunctions of criteria: a rule matches when every criterion it has matches. */
static __always_inline __u8 match(const struct policy *p, __u32 gen, const struct task_view *t)
{
	__u64 candidates = p->nrules >= 64 ? ~0ULL : ((1ULL << p->nrules) - 1);

	if (p->has_uid & candidates) {
		struct id_key k = {.gen = gen, .id = (__u32)t->uid_gid};
		candidates &= lookup_bits(&rule_uids, &k) | ~p->has_uid;
	}
	if (p->has_gid & candidates) {
		struct id_key k = {.gen = gen, .id = t->uid_gid >> 32};
		candidates &= lookup_bits(&rule_gids, &k) | ~p->has_gid;
	}
	if (p->has_exe & candidates) {
		struct exe_key k = {.gen = gen, .dev = t->exe_dev, .ino = t->exe_ino};
		candidates &= lookup_bits(&rule_exes, &k) | ~p->has_exe;
	}
	if (p->has_cgroup & candidates) {
		/* A unit, cgroup or container rule matches its cgroup and everything below. */
		__u64 bits = 0;
		for (int level = 0; level < CGROUP_LEVELS; level++) {
			__u64 id = bpf_get_current_ancestor_cgroup_id(level);
			if (!id)
				break;
			bits |= cgroup_rule_bits(gen, id);
		}
		candidates &= bits | ~p->has_cgroup;
	}
	if (!candidates)
		return RULE_NONE;
	/* Lowest set bit: rules are ordered, first match wins. */
	return lowest_bit(candidates);
}

/* ---- the event ---- */

/* Where the walk up the executable's path stands. */
struct exe_walk {
	struct dentry *d;        /* the next dentry to record (or cross, at a mount root) */
	struct dentry *mnt_root; /* root dentry of the mount d is on */
	struct mount *mnt;
};

/* One step of the walk up the executable's path: from the root of a mount, on to where
 * that mount hangs in its parent; otherwise record d's name and go to its parent.
 * Returns 1 to go on, 0 when the walk ended (root of the mount tree, or no parent, or
 * EXE_DEPTH names recorded). A global function, so that the verifier checks one step
 * once instead of every step of the loop in every state it can be reached in. */
__noinline int exe_step(struct event *e, struct exe_walk *w)
{
	if (!e || !w)
		return 0;
	struct dentry *d = w->d;
	struct mount *mnt = w->mnt;
	if (d == w->mnt_root) {
		struct mount *parent_mnt = BPF_CORE_READ(mnt, mnt_parent);
		if (parent_mnt == mnt)
			return 0; /* root of the mount tree */
		w->d = BPF_CORE_READ(mnt, mnt_mountpoint);
		w->mnt = parent_mnt;
		w->mnt_root = BPF_CORE_READ(parent_mnt, mnt.mnt_root);
		return 1;
	}
	struct dentry *parent = BPF_CORE_READ(d, d_parent);
	__u32 depth = e->exe_depth;
	if (!d || parent == d || depth >= EXE_DEPTH)
		return 0;
	const unsigned char *name = BPF_CORE_READ(d, d_name.name);
	bpf_probe_read_kernel_str(e->exe_names[depth & (EXE_DEPTH - 1)], EXE_NAME_LEN, name);
	e->exe_depth = depth + 1;
	w->d = parent;
	return 1;
}

static __always_inline void fill_exe(struct event *e)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct file *exe = BPF_CORE_READ(task, mm, exe_file);

	/* /proc/<pid>/stat shows the group leader's start time, whichever thread connects. */
	e->start_boottime = BPF_CORE_READ(task, group_leader, start_boottime);
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	if (!exe)
		return; /* kernel thread */

	/* Build the path the way d_path() does, which cgroup programs may not call: walk
	 * dentries up to the mount's root, then continue from where that mount hangs in its
	 * parent, until the root of the mount tree. Leaf first; user space reverses it. */
	struct vfsmount *vfsmnt = BPF_CORE_READ(exe, f_path.mnt);
	struct exe_walk w = {
		.d = BPF_CORE_READ(exe, f_path.dentry),
		.mnt_root = BPF_CORE_READ(vfsmnt, mnt_root),
		.mnt = (void *)vfsmnt - bpf_core_field_offset(struct mount, mnt),
	};
	for (int i = 0; i < EXE_WALK; i++) {
		if (!exe_step(e, &w))
			break;
	}
	if (w.d != w.mnt_root || e->exe_depth >= EXE_DEPTH)
		e->exe_truncated = 1; /* deeper than we walk: path is a suffix */
}

/* What emit() records besides the task, packed into one argument (a global function
 * takes at most five). */
static __always_inline __u64 meta(__u32 exe_dev, __u32 dst, __u8 verdict, __u8 rule, __u8 flags, __u8 udp_events)
{
	return (__u64)exe_dev << 32 | (__u64)(udp_events & 1) << 31 | (__u64)(dst & 15) << 24 | (__u64)flags << 16 |
	       (__u64)rule << 8 | verdict;
}

/* Counts a refused or UDP connect() in aggregates. Returns 1 when that is all it gets
 * (an entry for its kind exists, or a UDP connect without events.udp), 0 when it writes
 * its own event. */
static __always_inline int aggregated(struct bpf_sock_addr *ctx, __u64 cgroup_id, __u64 exe_ino, __u64 meta)
{
	__u8 verdict = meta & 0xff;
	__u8 udp = ctx->type != SOCK_STREAM;
	if (verdict != VERDICT_DENY && verdict != VERDICT_FAIL_CLOSED && !udp)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	struct agg_key k = {
		.tgid = bpf_get_current_pid_tgid() >> 32,
		.verdict = verdict,
		.rule = (meta >> 8) & 0xff,
		.flags = (meta >> 16) & 0xff,
		.udp = udp,
	};
	struct agg *a = bpf_map_lookup_elem(&aggregates, &k);
	if (a) {
		__sync_fetch_and_add(&a->count, 1);
		a->last_ns = now;
		return 1;
	}
	int quiet = udp && !((meta >> 31) & 1);
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 uid_gid = bpf_get_current_uid_gid();
	__u32 dst = (meta >> 24) & 15;
	struct agg n = {
		.count = quiet ? 1 : 0,
		.first_ns = now,
		.last_ns = now,
		.start_boottime = BPF_CORE_READ(task, group_leader, start_boottime),
		.cgroup_id = cgroup_id,
		.netns_cookie = bpf_get_netns_cookie(ctx),
		.exe_ino = exe_ino,
		.exe_dev = meta >> 32,
		.uid = (__u32)uid_gid,
		.gid = uid_gid >> 32,
		.family = dst_family(dst),
	};
	bpf_map_update_elem(&aggregates, &k, &n, BPF_NOEXIST);
	return quiet;
}

/* Writes one event for the current task's connect() to dst. cgroup_id, exe_ino and the
 * exe_dev in meta are the task_view judge() decided with. Returns 0. */
__noinline int emit(struct bpf_sock_addr *ctx, __u64 cookie, __u64 cgroup_id, __u64 exe_ino, __u64 meta)
{
	if (aggregated(ctx, cgroup_id, exe_ino, meta))
		return 0;
	__u8 verdict = meta & 0xff;
	struct event *e;
	if (verdict == VERDICT_DENY || verdict == VERDICT_FAIL_CLOSED || ctx->type != SOCK_STREAM)
		e = bpf_ringbuf_reserve(&events_refused, sizeof(*e), 0);
	else
		e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(STAT_RINGBUF_FULL);
		return 0;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 uid_gid = bpf_get_current_uid_gid();
	__u32 dst = (meta >> 24) & 15;

	e->ktime_ns = bpf_ktime_get_ns();
	e->cgroup_id = cgroup_id;
	e->netns_cookie = bpf_get_netns_cookie(ctx);
	e->socket_cookie = cookie;
	e->exe_ino = exe_ino;
	e->exe_dev = meta >> 32;
	e->tgid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->uid = (__u32)uid_gid;
	e->gid = uid_gid >> 32;
	e->verdict = meta & 0xff;
	e->rule = (meta >> 8) & 0xff;
	e->flags = (meta >> 16) & 0xff;
	e->exe_depth = 0;
	e->exe_truncated = 0;
	e->start_boottime = 0;
	e->ppid = 0;
	__builtin_memset(e->_pad, 0, sizeof(e->_pad));
	__builtin_memset(e->exe_names, 0, sizeof(e->exe_names));
	/* Before the walk of the executable's path: each of the walk's exits is a path
	 * the verifier follows to the end, so the end is kept short. */
	e->family = dst_family(dst);
	e->dport = dst_port(dst);
	dst_addr(e->daddr, dst);
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	fill_exe(e);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

static __always_inline void record(struct bpf_sock_addr *ctx, __u64 cookie, const struct task_view *t, __u32 dst,
				   __u8 verdict, __u8 rule, __u8 flags)
{
	emit(ctx, cookie, t->cgroup_id, t->exe_ino, meta(t->exe_dev, dst, verdict, rule, flags | t->flags, t->udp_events));
}

/* Judges one IMDS connect() to dst. Returns an enum judgement; the caller rewrites the
 * destination when it says redirect. */
__noinline int judge(struct bpf_sock_addr *ctx, __u32 dst)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 zero = 0;
	__u32 *genp = bpf_map_lookup_elem(&active_gen, &zero);
	__u32 gen = genp ? (*genp & 1) : 0;
	struct policy *p = bpf_map_lookup_elem(&policies, &gen);
	struct task_view t;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	/* The destination part of the redirect record first, before the paths split: the
	 * verifier would walk it again on each of them. */
	struct redirect r = {};
	dst_addr(r.daddr, dst);
	r.dport = dst_port(dst);
	r.family = dst_family(dst);

	read_task(&t);
	if (p)
		t.udp_events = p->events_udp;
	/* The agent's own socket: its cookie registered by the agent, from the agent's
	 * process, in the agent's namespace. Passed unjudged, never redirected, recorded. */
	if (p && p->agent_tgid && bpf_map_lookup_elem(&own_sockets, &cookie) &&
	    (t.pid_tgid >> 32) == p->agent_tgid && bpf_get_netns_cookie(ctx) == p->host_netns) {
		record(ctx, cookie, &t, dst, VERDICT_ALLOW, RULE_NONE, FLAG_AGENT);
		return JUDGE_PASS;
	}
	if (!p || !p->loaded) {
		/* No policy loaded yet (first start): witness only. */
		record(ctx, cookie, &t, dst, VERDICT_ALLOW, RULE_NONE, 0);
		return JUDGE_PASS;
	}

	__u8 rule = match(p, gen, &t);
	int allow = rule == RULE_NONE ? p->default_allow : (p->allow >> rule) & 1;
	__u8 flags = 0;
	if (rule != RULE_NONE && ((p->v2_required >> rule) & 1))
		flags |= FLAG_V2_REQUIRED;

	if (!allow) {
		if (p->enforce) {
			count(STAT_DENIED);
			record(ctx, cookie, &t, dst, VERDICT_DENY, rule, flags);
			return JUDGE_DENY;
		}
		count(STAT_AUDIT_DENIED);
	}
	__u8 verdict = allow ? VERDICT_ALLOW : VERDICT_AUDIT_DENY;

	/* Only TCP goes through the broker, and only to a family whose listener the agent
	 * holds: the host's loopback listeners for the agent's own network namespace, for
	 * another (a container's) the listeners the agent made inside it, published in
	 * netns_brokers (checked below, after the heartbeat). A rule that requires IMDSv2
	 * has no other way to be kept: a connection it matches that cannot be brokered is
	 * refused. */
	__u8 family = DST_KIND(dst) == DST_IPV6 ? BROKER_IPV6 : BROKER_IPV4;
	__u64 netns = bpf_get_netns_cookie(ctx);
	int host = netns == p->host_netns;
	if (!p->broker_port || sk->type != SOCK_STREAM || (host && !(p->broker_families & family))) {
		if (allow && (flags & FLAG_V2_REQUIRED)) {
			flags |= FLAG_NO_BROKER;
			if (p->enforce) {
				count(STAT_DENIED);
				record(ctx, cookie, &t, dst, VERDICT_DENY, rule, flags);
				return JUDGE_DENY;
			}
			count(STAT_AUDIT_DENIED);
			verdict = VERDICT_AUDIT_DENY;
		}
		record(ctx, cookie, &t, dst, verdict, rule, flags);
		return JUDGE_PASS;
	}
	__u64 *hb = bpf_map_lookup_elem(&heartbeat, &zero);
	/* Signed: a beat in the future (the grace period of a clean stop) is alive. */
	__s64 age = hb ? (__s64)(bpf_ktime_get_ns() - *hb) : 0;
	if (!hb || age > HEARTBEAT_TIMEOUT_NS || age < -HEARTBEAT_MAX_AHEAD_NS) {
		if (p->fail_closed) {
			count(STAT_FAIL_CLOSED);
			record(ctx, cookie, &t, dst, VERDICT_FAIL_CLOSED, rule, flags);
			return JUDGE_DENY;
		}
		count(STAT_FAIL_OPEN);
		record(ctx, cookie, &t, dst, allow ? VERDICT_FAIL_OPEN : verdict, rule, flags);
		return JUDGE_PASS;
	}
	if (!host) {
		/* A container's connection: to its own namespace's endpoint, when the agent
		 * published one for this family; else containers.fallback, and never direct
		 * for a rule that requires IMDSv2. */
		__u8 *fams = bpf_map_lookup_elem(&netns_brokers, &netns);
		if (!fams || !(*fams & family)) {
			flags |= FLAG_NO_BROKER;
			if (allow && (containers_deny || (flags & FLAG_V2_REQUIRED))) {
				if (p->enforce) {
					count(STAT_DENIED);
					record(ctx, cookie, &t, dst, VERDICT_DENY, rule, flags);
					return JUDGE_DENY;
				}
				count(STAT_AUDIT_DENIED);
				verdict = VERDICT_AUDIT_DENY;
			}
			record(ctx, cookie, &t, dst, verdict, rule, flags);
			return JUDGE_PASS;
		}
	}

	r.start_boottime = t.start_boottime;
	r.cgroup_id = t.cgroup_id;
	r.exe_ino = t.exe_ino;
	r.exe_dev = t.exe_dev;
	r.tgid = t.pid_tgid >> 32;
	r.tid = (__u32)t.pid_tgid;
	r.uid = (__u32)t.uid_gid;
	r.gid = t.uid_gid >> 32;
	r.rule = rule;
	r.flags = flags | FLAG_REDIRECTED;
	r.verdict = verdict;
	if (bpf_map_update_elem(&redirects, &cookie, &r, BPF_ANY)) {
		/* Cannot remember it: the broker would refuse it, so go direct. */
		record(ctx, cookie, &t, dst, verdict, rule, flags);
		return JUDGE_PASS;
	}
	count(STAT_REDIRECTED);
	record(ctx, cookie, &t, dst, verdict, rule, flags | FLAG_REDIRECTED);
	return JUDGE_REDIRECT | p->broker_port;
}

/* A refused connect(): 0, with ECONNREFUSED instead of the default EPERM where the
 * kernel allows it. */
static __always_inline int deny(void)
{
	if (deny_refused)
		bpf_set_retval(-ECONNREFUSED);
	return 0;
}

/* A connect() judge() let through straight to IMDS: its packets pass the egress
 * backstop. Returns 1. */
static __always_inline int approve(struct bpf_sock_addr *ctx)
{
	struct sk_verdict *v = bpf_sk_storage_get(&sk_verdicts, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (v)
		v->approved = 1;
	return 1;
}

/* The index of the guarded IPv4 entry ip:port (network byte order), -1 for none. The
 * loop is unrolled and guarded_n4 is a constant: a connect() to anything else costs two
 * compares per entry in use. */
static __always_inline int guarded4(__u32 ip, __u32 port)
{
#pragma unroll
	for (int i = 0; i < MAX_GUARDED; i++) {
		if (i < guarded_n4 && ip == guarded_ip4[i] && port == (__u32)guarded_port4[i])
			return i;
	}
	return -1;
}

static __always_inline int guarded6(const __u32 ip[4], __u32 port)
{
#pragma unroll
	for (int i = 0; i < MAX_GUARDED; i++) {
		if (i < guarded_n6 && port == (__u32)guarded_port6[i] && ip[3] == guarded_ip6[i][3] &&
		    ip[2] == guarded_ip6[i][2] && ip[1] == guarded_ip6[i][1] && ip[0] == guarded_ip6[i][0])
			return i;
	}
	return -1;
}

/* A connect() judge() let through: 1, after pointing a redirected one at the broker. In
 * the client's own network namespace: for a container, the agent's listener there. */
SEC("cgroup/connect4")
int imds_connect4(struct bpf_sock_addr *ctx)
{
	int i = guarded4(ctx->user_ip4, ctx->user_port);
	if (i < 0)
		return 1;
	int j = judge(ctx, DST_IPV4 | (i << 2));
	if (j & JUDGE_REDIRECT) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = j & 0xffff;
		return 1;
	}
	return j == JUDGE_DENY ? deny() : approve(ctx);
}

SEC("cgroup/connect6")
int imds_connect6(struct bpf_sock_addr *ctx)
{
	__u32 port = ctx->user_port;
	__u32 ip[4];
	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	__u32 dst;
	int i;
	/* IPv4-mapped (::ffff:a.b.c.d): what a dual-stack socket uses for IPv4. */
	if (ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0x0000ffff)) {
		i = guarded4(ip[3], port);
		dst = DST_IPV4_MAPPED;
	} else {
		i = guarded6(ip, port);
		dst = DST_IPV6;
	}
	if (i < 0)
		return 1;
	int j = judge(ctx, dst | (i << 2));
	if (j & JUDGE_REDIRECT) {
		/* ::ffff:127.0.0.1 keeps a mapped connection IPv4; [::1] otherwise. */
		int mapped = dst == DST_IPV4_MAPPED;
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = mapped ? bpf_htonl(0x0000ffff) : 0;
		ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
		ctx->user_port = j & 0xffff;
		return 1;
	}
	return j == JUDGE_DENY ? deny() : approve(ctx);
}

/* The client asked for IMDS: getpeername() must say IMDS, not the broker. */
static __always_inline struct redirect *redirected(void *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	return bpf_map_lookup_elem(&redirects, &cookie);
}

SEC("cgroup/getpeername4")
int imds_getpeername4(struct bpf_sock_addr *ctx)
{
	struct redirect *r = redirected(ctx);
	if (r && r->family == AF_INET) {
		__u32 ip;
		__builtin_memcpy(&ip, r->daddr, 4);
		ctx->user_ip4 = ip;
		ctx->user_port = (__u32)bpf_htons(r->dport);
	}
	return 1;
}

SEC("cgroup/getpeername6")
int imds_getpeername6(struct bpf_sock_addr *ctx)
{
	struct redirect *r = redirected(ctx);
	if (r && r->family == AF_INET6) {
		__u32 ip[4];
		__builtin_memcpy(ip, r->daddr, 16);
		ctx->user_ip6[0] = ip[0];
		ctx->user_ip6[1] = ip[1];
		ctx->user_ip6[2] = ip[2];
		ctx->user_ip6[3] = ip[3];
		ctx->user_port = (__u32)bpf_htons(r->dport);
	}
	return 1;
}

SEC("sockops")
int imds_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB || !broker_port ||
	    (__u16)(skops->remote_port >> 16) != broker_port)
		return 1;
	/* Every connection to the broker port gets an entry, redirected or not, so a
	 * stale entry can never vouch for a socket that was not redirected; and the entry
	 * names the whole connection, so no other connection (another source address, the
	 * same port) can claim it. */
	struct conn_key k = {};
	__u32 *client = (__u32 *)k.client, *server = (__u32 *)k.server;
	k.netns = bpf_get_netns_cookie(skops);
	k.client_port = (__u16)skops->local_port;
	k.server_port = bpf_ntohs(broker_port);
	/* Every field read up front by a volatile load of its own: clang would otherwise
	 * share one load between the branches at two context offsets (a pointer picked by
	 * the branch), which the verifier refuses. */
#define CTX(f) (*(volatile __u32 *)&skops->f)
	__u32 family = CTX(family), l4 = CTX(local_ip4), r4 = CTX(remote_ip4);
	__u32 l6[4] = {CTX(local_ip6[0]), CTX(local_ip6[1]), CTX(local_ip6[2]), CTX(local_ip6[3])};
	__u32 r6[4] = {CTX(remote_ip6[0]), CTX(remote_ip6[1]), CTX(remote_ip6[2]), CTX(remote_ip6[3])};
#undef CTX
	if (family == AF_INET) {
		l6[0] = l6[1] = r6[0] = r6[1] = 0;
		l6[2] = r6[2] = bpf_htonl(0x0000ffff);
		l6[3] = l4;
		r6[3] = r4;
	}
	__builtin_memcpy(client, l6, 16);
	__builtin_memcpy(server, r6, 16);
	__u64 cookie = bpf_get_socket_cookie(skops);
	bpf_map_update_elem(&broker_conns, &k, &cookie, BPF_ANY);
	return 1;
}

SEC("cgroup/sock_create")
int imds_sock_create(struct bpf_sock *ctx)
{
	if (!host_netns_cookie)
		return 1;
	__u64 netns = bpf_get_netns_cookie(ctx);
	if (netns == host_netns_cookie)
		return 1;
	struct netns_seen_key k = {.netns = netns, .tgid = bpf_get_current_pid_tgid() >> 32};
	if (bpf_map_lookup_elem(&netns_seen, &k))
		return 1;
	__u8 one = 1;
	if (bpf_map_update_elem(&netns_seen, &k, &one, BPF_NOEXIST))
		return 1; /* another thread reported it first */
	struct netns_seen_event *e = bpf_ringbuf_reserve(&netns_events, sizeof(*e), 0);
	if (!e)
		return 1;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	e->netns_cookie = netns;
	e->tgid = k.tgid;
	e->start_boottime = BPF_CORE_READ(task, group_leader, start_boottime);
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_ringbuf_submit(e, 0);
	return 1;
}

/* The guarded cgroup, set by the agent when it attaches: the network namespaces its
 * processes fork into are the ones worth serving (imds_fork below). */
struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} guarded_cgroup SEC(".maps");

/* ---- the last packets: cgroup_skb egress ----
 *
 * A packet to IMDS from a socket connect4/6 did not let through to it is dropped: a raw
 * socket's (SOCK_RAW, IPPROTO_RAW with IP_HDRINCL: no connect hook runs), a UDP sendto()
 * (sendmsg hooks are not attached), a connection netfilter rewrote to IMDS after its
 * connect() was judged by the address asked for. Redirected connections go to loopback
 * and never match. The verdict is the packet's destination as it leaves, after DNAT.
 * Packet sockets (AF_PACKET) skip the IP stack and this hook: see docs/guarding.md. */

/* A packet to IMDS. The slow path: policy, socket storage, the process's aggregate. */
__noinline int backstop(struct __sk_buff *skb, __u32 family)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1; /* request and time-wait sockets: the kernel's own TCP replies */
	struct sk_verdict *v = bpf_sk_storage_get(&sk_verdicts, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!v)
		return 0;
	if (v->approved)
		return 1;
	if (!v->tgid) {
		/* The first packet is sent from the process's own call (sendmsg, connect). */
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();
		v->tgid = bpf_get_current_pid_tgid() >> 32;
		v->start_boottime = BPF_CORE_READ(task, group_leader, start_boottime);
	}
	__u32 zero = 0;
	__u32 *genp = bpf_map_lookup_elem(&active_gen, &zero);
	__u32 gen = genp ? (*genp & 1) : 0;
	struct policy *p = bpf_map_lookup_elem(&policies, &gen);
	int drop = p && p->loaded && p->enforce;
	count(drop ? STAT_BACKSTOP_DROPPED : STAT_BACKSTOP_AUDIT);

	/* One summary per process per flush (no event of its own): the count starts at 1. */
	__u64 now = bpf_ktime_get_ns();
	struct agg_key k = {
		.tgid = v->tgid,
		.verdict = drop ? VERDICT_DENY : VERDICT_AUDIT_DENY,
		.rule = RULE_NONE,
		.flags = FLAG_BACKSTOP,
	};
	struct agg *a = bpf_map_lookup_elem(&aggregates, &k);
	if (a) {
		__sync_fetch_and_add(&a->count, 1);
		a->last_ns = now;
		return !drop;
	}
	struct agg n = {
		.count = 1,
		.first_ns = now,
		.last_ns = now,
		.start_boottime = v->start_boottime,
		.cgroup_id = bpf_skb_cgroup_id(skb),
		.uid = bpf_get_socket_uid(skb),
		.family = family,
	};
	bpf_map_update_elem(&aggregates, &k, &n, BPF_NOEXIST);
	return !drop;
}

/* Whether ip is a guarded address, whatever the port: the backstop stops every packet
 * to a credential endpoint's address from a socket no connect() approved. */
static __always_inline int guarded_addr4(__u32 ip)
{
#pragma unroll
	for (int i = 0; i < MAX_GUARDED; i++) {
		if (i < guarded_n4 && ip == guarded_ip4[i])
			return 1;
	}
	return 0;
}

static __always_inline int guarded_addr6(const __u32 ip[4])
{
#pragma unroll
	for (int i = 0; i < MAX_GUARDED; i++) {
		if (i < guarded_n6 && ip[3] == guarded_ip6[i][3] && ip[2] == guarded_ip6[i][2] &&
		    ip[1] == guarded_ip6[i][1] && ip[0] == guarded_ip6[i][0])
			return 1;
	}
	return 0;
}

SEC("cgroup_skb/egress")
int imds_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	__u32 d[4];
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (data + 20 <= end)
			d[0] = *(__u32 *)(data + 16);
		else if (bpf_skb_load_bytes(skb, 16, d, 4))
			return 1;
		return guarded_addr4(d[0]) ? backstop(skb, AF_INET) & 1 : 1;
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (data + 40 <= end)
			__builtin_memcpy(d, data + 24, 16);
		else if (bpf_skb_load_bytes(skb, 24, d, 16))
			return 1;
		return guarded_addr6(d) ? backstop(skb, AF_INET6) & 1 : 1;
	}
	return 1;
}

/* ---- the executable's identity, recorded at exec (BTF tracepoints) ----
 *
 * Tracing programs, not BPF LSM: they need BTF (Linux 5.11+ for task storage in them)
 * but no `bpf` among the active LSMs, and they load where lockdown refuses LSM
 * programs. sched_process_exec fires once the new image is committed, in the task that
 * exec'd (by then the leader of its thread group); sched_process_fork fires in the parent
 * before the child first runs, so no child connects before it has its record. */

/* ctx: struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm */
SEC("tp_btf/sched_process_exec")
int imds_exec(unsigned long long *ctx)
{
	struct task_struct *p = (void *)ctx[0];
	struct linux_binprm *bprm = (void *)ctx[2];
	struct exec_id *id = bpf_task_storage_get(&exec_ids, p, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!id)
		return 0;
	struct file *f = BPF_CORE_READ(bprm, file);
	id->ino = BPF_CORE_READ(f, f_inode, i_ino);
	id->dev = BPF_CORE_READ(f, f_inode, i_sb, s_dev);
	return 0;
}

/* A process of the guarded cgroup forked into a network namespace not yet reported
 * (runc's nsexec unshares CLONE_NEWNET and forks the container's init, which stays):
 * reported at that fork, milliseconds before the container's process runs, where its
 * first socket (sock_create above) comes about a millisecond before a container that
 * connects at once does. One hash look-up per fork in such a namespace. */
static __always_inline void report_netns(struct task_struct *child)
{
	if (!host_netns_cookie)
		return;
	__u64 cookie = BPF_CORE_READ(child, nsproxy, net_ns, net_cookie);
	if (!cookie || cookie == host_netns_cookie)
		return;
	if (bpf_current_task_under_cgroup(&guarded_cgroup, 0) != 1)
		return;
	struct netns_seen_key k = {.netns = cookie, .tgid = child->tgid};
	__u8 one = 1;
	if (bpf_map_update_elem(&netns_seen, &k, &one, BPF_NOEXIST))
		return;
	struct netns_seen_event *e = bpf_ringbuf_reserve(&netns_events, sizeof(*e), 0);
	if (!e)
		return;
	e->netns_cookie = cookie;
	e->tgid = k.tgid;
	e->start_boottime = child->start_boottime;
	e->ppid = bpf_get_current_pid_tgid() >> 32;
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_ringbuf_submit(e, 0);
}

/* A new process runs its parent's executable until it execs. */
/* ctx: struct task_struct *parent, struct task_struct *child */
SEC("tp_btf/sched_process_fork")
int imds_fork(unsigned long long *ctx)
{
	struct task_struct *parent = (void *)ctx[0];
	struct task_struct *child = (void *)ctx[1];
	/* Threads are judged by their leader's record: only a new process needs one. */
	if (child->group_leader != child)
		return 0;
	report_netns(child);
	struct exec_id *from = bpf_task_storage_get(&exec_ids, parent->group_leader, 0, 0);
	if (!from)
		return 0;
	struct exec_id *to = bpf_task_storage_get(&exec_ids, child, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (to) {
		to->ino = from->ino;
		to->dev = from->dev;
	}
	return 0;
}
