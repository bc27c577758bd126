// SPDX-License-Identifier: GPL-2.0
/* imdsguard's connect hooks: attribute every connect() to the Instance Metadata Service
 * to the process that made it, at the moment it makes it.
 *
 * These programs run on every connect() in the guarded cgroup, so the common case (not
 * IMDS) must return after a couple of compares and touch no map.
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

#define VERDICT_ALLOW 0

/* Set by the loader before load (spec.Variables); network byte order. */
volatile const __u32 imds_ip4 = 0;
volatile const __u32 imds_ip6[4] = {0, 0, 0, 0};
volatile const __u16 imds_port = 0;

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
	__u8 verdict;
	__u8 exe_depth;        /* components filled in exe_names, leaf first */
	__u8 exe_truncated;    /* exe_names hold only the last components of the path */
	__u8 _pad[1];
	char comm[TASK_COMM_LEN];
	char exe_names[EXE_DEPTH][EXE_NAME_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22); /* 4 MiB: ~6k events of headroom */
} events SEC(".maps");

/* Counters read by user space: index 0 = events dropped because the ring was full. */
#define STAT_RINGBUF_FULL 0
#define STAT_MAX 1
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* Keeps struct event in BTF for bpf2go's -type. */
const struct event *unused_event __attribute__((unused));

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);
	if (v)
		(*v)++;
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
	e->exe_ino = BPF_CORE_READ(exe, f_inode, i_ino);
	e->exe_dev = BPF_CORE_READ(exe, f_inode, i_sb, s_dev);

	/* Build the path the way d_path() does, which cgroup programs may not call: walk
	 * dentries up to the mount's root, then continue from where that mount hangs in its
	 * parent, until the root of the mount tree. Leaf first; user space reverses it. */
	struct vfsmount *vfsmnt = BPF_CORE_READ(exe, f_path.mnt);
	struct mount *mnt = (void *)vfsmnt - bpf_core_field_offset(struct mount, mnt);
	struct dentry *mnt_root = BPF_CORE_READ(vfsmnt, mnt_root);
	struct dentry *d = BPF_CORE_READ(exe, f_path.dentry);
	__u32 depth = 0;
#pragma unroll
	for (int i = 0; i < EXE_WALK; i++) {
		if (d == mnt_root) {
			struct mount *parent_mnt = BPF_CORE_READ(mnt, mnt_parent);
			if (parent_mnt == mnt)
				break; /* root of the mount tree */
			d = BPF_CORE_READ(mnt, mnt_mountpoint);
			mnt = parent_mnt;
			mnt_root = BPF_CORE_READ(mnt, mnt.mnt_root);
			continue;
		}
		struct dentry *parent = BPF_CORE_READ(d, d_parent);
		if (!d || parent == d || depth >= EXE_DEPTH)
			break;
		const unsigned char *name = BPF_CORE_READ(d, d_name.name);
		bpf_probe_read_kernel_str(e->exe_names[depth & (EXE_DEPTH - 1)], EXE_NAME_LEN, name);
		depth++;
		d = parent;
	}
	if (d != mnt_root || depth >= EXE_DEPTH)
		e->exe_truncated = 1; /* deeper than we walk: path is a suffix */
	e->exe_depth = depth;
}

static __always_inline int record(struct bpf_sock_addr *ctx, __u16 family, const __u32 ip[4], int v4)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(STAT_RINGBUF_FULL);
		return 1;
	}
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u64 uid_gid = bpf_get_current_uid_gid();

	e->ktime_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->netns_cookie = bpf_get_netns_cookie(ctx);
	e->socket_cookie = bpf_get_socket_cookie(ctx);
	e->tgid = pid_tgid >> 32;
	e->tid = (__u32)pid_tgid;
	e->uid = (__u32)uid_gid;
	e->gid = uid_gid >> 32;
	e->family = family;
	e->dport = bpf_ntohs(imds_port);
	__builtin_memset(e->daddr, 0, sizeof(e->daddr));
	if (v4) {
		__builtin_memcpy(e->daddr, &ip[0], 4);
	} else {
		__builtin_memcpy(e->daddr, ip, 16);
	}
	e->verdict = VERDICT_ALLOW;
	e->exe_depth = 0;
	e->exe_truncated = 0;
	e->exe_ino = 0;
	e->exe_dev = 0;
	e->start_boottime = 0;
	e->ppid = 0;
	__builtin_memset(e->_pad, 0, sizeof(e->_pad));
	__builtin_memset(e->exe_names, 0, sizeof(e->exe_names));
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	fill_exe(e);
	bpf_ringbuf_submit(e, 0);
	return 1;
}

SEC("cgroup/connect4")
int imds_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip4 != imds_ip4 || ctx->user_port != (__u32)imds_port)
		return 1;
	__u32 ip[4] = {ctx->user_ip4, 0, 0, 0};
	return record(ctx, AF_INET, ip, 1);
}

SEC("cgroup/connect6")
int imds_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->user_port != (__u32)imds_port)
		return 1;
	__u32 ip[4];
	ip[0] = ctx->user_ip6[0];
	ip[1] = ctx->user_ip6[1];
	ip[2] = ctx->user_ip6[2];
	ip[3] = ctx->user_ip6[3];
	if (ip[0] == imds_ip6[0] && ip[1] == imds_ip6[1] && ip[2] == imds_ip6[2] && ip[3] == imds_ip6[3])
		return record(ctx, AF_INET6, ip, 0);
	/* IPv4-mapped (::ffff:a.b.c.d): what a dual-stack socket uses for IPv4. */
	if (ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0x0000ffff) && ip[3] == imds_ip4)
		return record(ctx, AF_INET6, ip, 0);
	return 1;
}
