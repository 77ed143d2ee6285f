/* vfiomig demo: its child processes (start, wait for their sockets, stop and
 * reap) and the private temp dir they live in. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "demo.h"

double demo_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void sleep_ms(int ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);  /* EINTR: the caller's loop checks its flags */
}

/* In the child between fork and exec: only async-signal-safe calls. */
static void child_exec(char *const argv[], int log_fd, int err_fd, pid_t parent)
{
	struct sigaction dfl = { .sa_handler = SIG_DFL };
	sigset_t none;
	int null_fd, e;

	setpgid(0, 0);
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	/* The parent may have died before prctl: then nobody would stop us. */
	if (getppid() != parent)
		_exit(127);
	/* Ignored signals and the mask survive exec; handlers do not matter. */
	sigemptyset(&dfl.sa_mask);
	sigaction(SIGPIPE, &dfl, NULL);
	sigaction(SIGINT, &dfl, NULL);
	sigaction(SIGTERM, &dfl, NULL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	null_fd = open("/dev/null", O_RDONLY);
	if (null_fd < 0 || dup2(null_fd, 0) < 0 || dup2(log_fd, 1) < 0 || dup2(log_fd, 2) < 0)
		goto fail;
	execv(argv[0], argv);
fail:
	e = errno;
	if (write(err_fd, &e, sizeof(e)) < 0) {
		/* nothing left to tell anyone */
	}
	_exit(127);
}

int demo_child_spawn(struct demo_child *c, const char *name, const char *log_path,
		     char *const argv[], struct vfm_error *err)
{
	int log_fd, pfd[2], e = 0;
	pid_t parent = getpid(), pid;
	ssize_t n;

	memset(c, 0, sizeof(*c));
	snprintf(c->name, sizeof(c->name), "%s", name);
	snprintf(c->log_path, sizeof(c->log_path), "%s", log_path);
	log_fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600);
	if (log_fd < 0)
		return vfm_error_set(err, -errno, "%s: cannot create %s: %s", name, log_path,
				     strerror(errno));
	/* A close-on-exec pipe tells the parent whether exec worked. */
	if (pipe2(pfd, O_CLOEXEC)) {
		e = errno;
		close(log_fd);
		return vfm_error_set(err, -e, "%s: pipe: %s", name, strerror(e));
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		e = errno;
		close(log_fd);
		close(pfd[0]);
		close(pfd[1]);
		return vfm_error_set(err, -e, "%s: fork: %s", name, strerror(e));
	}
	if (pid == 0) {
		close(pfd[0]);
		child_exec(argv, log_fd, pfd[1], parent);
	}
	/* Also set here so that a signal to the group cannot race the child's call. */
	setpgid(pid, pid);
	c->pid = pid;
	close(log_fd);
	close(pfd[1]);
	do {
		n = read(pfd[0], &e, sizeof(e));
	} while (n < 0 && errno == EINTR);
	close(pfd[0]);
	if (n == (ssize_t)sizeof(e)) {
		waitpid(pid, &c->status, 0);
		c->reaped = true;
		return vfm_error_set(err, -e, "%s: cannot run %s: %s", name, argv[0], strerror(e));
	}
	return 0;
}

bool demo_child_exited(struct demo_child *c)
{
	pid_t r;

	if (!c->pid || c->reaped)
		return true;
	do {
		r = waitpid(c->pid, &c->status, WNOHANG);
	} while (r < 0 && errno == EINTR);
	if (r == c->pid || (r < 0 && errno == ECHILD)) {
		c->reaped = true;
		return true;
	}
	return false;
}

const char *demo_child_describe(const struct demo_child *c, char *buf, size_t len)
{
	if (!c->pid)
		snprintf(buf, len, "not started");
	else if (!c->reaped)
		snprintf(buf, len, "running");
	else if (WIFEXITED(c->status))
		snprintf(buf, len, "exited with status %d", WEXITSTATUS(c->status));
	else if (WIFSIGNALED(c->status))
		snprintf(buf, len, "killed by signal %d (%s)", WTERMSIG(c->status),
			 strsignal(WTERMSIG(c->status)));
	else
		snprintf(buf, len, "ended (status 0x%x)", (unsigned)c->status);
	return buf;
}

void demo_children_stop(struct demo_child *cs, size_t n, int grace_ms)
{
	double deadline = demo_now_ms() + grace_ms;
	bool left;

	for (size_t i = 0; i < n; i++)
		if (!demo_child_exited(&cs[i]))
			kill(cs[i].pid, SIGTERM);
	do {
		left = false;
		for (size_t i = 0; i < n; i++)
			if (!demo_child_exited(&cs[i]))
				left = true;
		if (left)
			sleep_ms(10);
	} while (left && demo_now_ms() < deadline);
	for (size_t i = 0; i < n; i++) {
		if (demo_child_exited(&cs[i]))
			continue;
		kill(cs[i].pid, SIGKILL);
		while (waitpid(cs[i].pid, &cs[i].status, 0) < 0 && errno == EINTR)
			;
		cs[i].reaped = true;
	}
}

/*
 * Whether a socket bound at path is listening, from /proc/net/unix: a bound
 * socket accepts connections only after listen(), and a probe connection
 * would make a one-client-at-a-time server serve (and log) a client that
 * says nothing. Returns 1 listening, 0 not (yet), -1 when the table cannot
 * be read.
 */
/* Whether name is path's temporary bind name, "PATH.DIGITS~". */
static bool bound_as_temp(const char *name, const char *path)
{
	size_t n = strlen(path), i;

	if (strncmp(name, path, n) || name[n] != '.')
		return false;
	for (i = n + 1; name[i] >= '0' && name[i] <= '9'; i++)
		;
	return i > n + 1 && name[i] == '~' && name[i + 1] == '\0';
}

static int unix_listening(const char *path)
{
	char line[512 + PATH_MAX];
	FILE *f = fopen("/proc/net/unix", "re");
	int found = 0;

	if (!f)
		return -1;
	/* Num RefCount Protocol Flags Type St Inode Path */
	while (fgets(line, sizeof(line), f)) {
		unsigned long flags;
		char *p = line, *end;
		int field;

		for (field = 0; field < 3 && p; field++) {
			p = strchr(p, ' ');
			while (p && *p == ' ')
				p++;
		}
		if (!p)
			continue;
		flags = strtoul(p, &end, 16);
		for (field = 3; field < 7 && p; field++) {
			p = strchr(p, ' ');
			while (p && *p == ' ')
				p++;
		}
		if (!p)
			continue;
		p[strcspn(p, "\n")] = '\0';
		/* __SO_ACCEPTCON: the kernel's mark of a listening socket. Our server
		 * library binds at "PATH.PID~" and renames once it listens: the
		 * kernel keeps showing the name it was bound at. */
		if ((!strcmp(p, path) || bound_as_temp(p, path)) && (flags & 0x10000)) {
			found = 1;
			break;
		}
	}
	fclose(f);
	return found;
}

static int probe_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	int r;

	if (fd < 0)
		return 0;
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	r = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
	/* EAGAIN: the backlog is full, so somebody listens. */
	r = !r || errno == EAGAIN;
	close(fd);
	return r;
}

int demo_wait_socket(const char *path, struct demo_child *owner, int timeout_ms,
		     volatile sig_atomic_t *stop, struct vfm_error *err)
{
	double deadline = demo_now_ms() + timeout_ms;
	char how[96];
	struct stat st;

	for (;;) {
		if (stop && *stop)
			return vfm_error_set(err, -EINTR, "interrupted");
		if (!lstat(path, &st) && S_ISSOCK(st.st_mode)) {
			int l = unix_listening(path);

			if (l > 0 || (l < 0 && probe_connect(path)))
				return 0;
		}
		if (owner && demo_child_exited(owner))
			return vfm_error_set(err, -ECHILD, "%s %s before it listened on %s",
					     owner->name,
					     demo_child_describe(owner, how, sizeof(how)), path);
		if (demo_now_ms() >= deadline)
			return vfm_error_set(err, -ETIMEDOUT, "%s: no socket at %s after %d ms",
					     owner ? owner->name : "child", path, timeout_ms);
		sleep_ms(10);
	}
}

void demo_tail(const char *path, int max_lines, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	off_t size, from;
	ssize_t n;
	char *p;
	int lines = 0;

	if (!len)
		return;
	buf[0] = '\0';
	if (fd < 0)
		return;
	size = lseek(fd, 0, SEEK_END);
	from = size > (off_t)len - 1 ? size - (off_t)len + 1 : 0;
	n = pread(fd, buf, len - 1, from);
	close(fd);
	if (n <= 0)
		return;
	buf[n] = '\0';
	while (n > 0 && buf[n - 1] == '\n')
		buf[--n] = '\0';
	/* Walk back over max_lines line breaks. */
	for (p = buf + n; p > buf; p--) {
		if (p[-1] == '\n' && ++lines == max_lines)
			break;
	}
	if (p > buf)
		memmove(buf, p, strlen(p) + 1);
}

int demo_tmpdir_create(char *dir, size_t len, struct vfm_error *err)
{
	const char *base = getenv("TMPDIR");

	/* Socket paths must fit sun_path (108 bytes) with room for the names. */
	if (!base || !*base || base[0] != '/' || strlen(base) > 60)
		base = "/tmp";
	if ((size_t)snprintf(dir, len, "%s/vfiomig-demo.XXXXXX", base) >= len)
		return vfm_error_set(err, -ENAMETOOLONG, "temp dir name too long");
	if (!mkdtemp(dir))  /* mode 0700 */
		return vfm_error_set(err, -errno, "cannot create a temp dir in %s: %s", base,
				     strerror(errno));
	return 0;
}

void demo_tmpdir_remove(const char *dir)
{
	DIR *d;
	struct dirent *e;

	if (!dir || !*dir)
		return;
	d = opendir(dir);
	if (d) {
		while ((e = readdir(d))) {
			char sub[512];

			if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
				continue;
			/* Subdirectories (--tls credentials) go too; a symbolic link
			 * is unlinked, never followed. */
			if (unlinkat(dirfd(d), e->d_name, 0) < 0 && errno == EISDIR &&
			    (size_t)snprintf(sub, sizeof(sub), "%s/%s", dir, e->d_name) < sizeof(sub))
				demo_tmpdir_remove(sub);
		}
		closedir(d);
	}
	rmdir(dir);
}
