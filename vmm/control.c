/*
 * The control socket server: listening safely, line framing with a 64 KiB
 * bound, the QMP session (greeting, capabilities negotiation, commands, ids,
 * errors), the command table, and the event queue other threads feed.
 */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "util/logging.h"
#include "vfiomig.h"
#include "vmm/control.h"

#define LOG "control"
#define LINE_MAX_BYTES (64u << 10)
/* A client that reads nothing while this much piles up is dropped. */
#define OUT_MAX_BYTES (4u << 20)
#define EVENTS_MAX 1024

struct ctl_event {
	struct ctl_event *next;
	char *line;
};

struct control {
	/* Never change after control_open. */
	char path[108];
	struct vm *vm;
	int listen_fd;
	ino_t sock_ino;
	int wake_fd;                 /* eventfd: events queued */

	/* Main loop thread only. */
	int client_fd;               /* -1: none */
	bool capture;                /* detached (tests): replies only collect in out */
	bool negotiated;
	bool discarding;             /* dropping the rest of an overlong line */
	char *in;
	size_t in_len;
	char *out;
	size_t out_len, out_cap;
	bool quit;

	pthread_mutex_t lock;
	/* Guarded by lock. */
	struct ctl_event *ev_head, **ev_tail;
	unsigned nev;
};

/* ---- Output ---- */

static void drop_client(struct control *c, const char *why)
{
	if (c->client_fd < 0)
		return;
	vfm_debug(LOG, "client gone (%s)", why);
	close(c->client_fd);
	c->client_fd = -1;
	c->negotiated = c->discarding = false;
	c->in_len = c->out_len = 0;
}

static void try_write(struct control *c)
{
	while (c->client_fd >= 0 && c->out_len) {
		ssize_t n = send(c->client_fd, c->out, c->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n > 0) {
			memmove(c->out, c->out + n, c->out_len - (size_t)n);
			c->out_len -= (size_t)n;
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			return;
		} else {
			drop_client(c, strerror(errno));
		}
	}
}

static void send_text(struct control *c, const char *s)
{
	size_t len = strlen(s);

	if (c->client_fd < 0 && !c->capture)
		return;
	if (c->out_len + len + 1 > OUT_MAX_BYTES) {
		drop_client(c, "it reads nothing");
		return;
	}
	if (c->out_len + len + 1 > c->out_cap) {
		size_t cap = (c->out_len + len + 1) * 2;
		char *p = realloc(c->out, cap);

		if (!p) {
			drop_client(c, "out of memory");
			return;
		}
		c->out = p;
		c->out_cap = cap;
	}
	memcpy(c->out + c->out_len, s, len);
	c->out[c->out_len + len] = '\n';
	c->out_len += len + 1;
	if (!c->capture)
		try_write(c);
}

static void send_object(struct control *c, json_object *o)
{
	send_text(c, json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
	json_object_put(o);
}

static void reply_error(struct control *c, json_object *id, const char *cls, const char *desc)
{
	json_object *o = json_object_new_object(), *e = json_object_new_object();

	json_object_object_add(e, "class", json_object_new_string(cls));
	json_object_object_add(e, "desc", json_object_new_string(desc));
	json_object_object_add(o, "error", e);
	if (id)
		json_object_object_add(o, "id", json_object_get(id));
	send_object(c, o);
}

static void reply_return(struct control *c, json_object *id, json_object *ret)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "return", ret ? ret : json_object_new_object());
	if (id)
		json_object_object_add(o, "id", json_object_get(id));
	send_object(c, o);
}

/* ---- Events ---- */

void control_event(struct control *c, const char *name, json_object *data)
{
	json_object *o = json_object_new_object(), *ts = json_object_new_object();
	struct ctl_event *ev = calloc(1, sizeof(*ev));
	struct timeval tv;
	uint64_t one = 1;

	gettimeofday(&tv, NULL);
	json_object_object_add(o, "event", json_object_new_string(name));
	json_object_object_add(o, "data", data ? data : json_object_new_object());
	json_object_object_add(ts, "seconds", json_object_new_int64(tv.tv_sec));
	json_object_object_add(ts, "microseconds", json_object_new_int64(tv.tv_usec));
	json_object_object_add(o, "timestamp", ts);
	if (ev)
		ev->line = strdup(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
	json_object_put(o);
	if (!ev || !ev->line) {
		free(ev);
		return;
	}
	pthread_mutex_lock(&c->lock);
	if (c->nev >= EVENTS_MAX) {
		/* The main loop is stuck; an event is not worth unbounded memory. */
		pthread_mutex_unlock(&c->lock);
		free(ev->line);
		free(ev);
		return;
	}
	*c->ev_tail = ev;
	c->ev_tail = &ev->next;
	c->nev++;
	pthread_mutex_unlock(&c->lock);
	if (write(c->wake_fd, &one, sizeof(one)) < 0)
		vfm_debug(LOG, "wake: %s", strerror(errno));
}

void control_vm_event(void *opaque, const char *name, json_object *data)
{
	control_event(opaque, name, data);
}

static void drain_events(struct control *c)
{
	struct ctl_event *ev, *next;
	uint64_t v;

	if (read(c->wake_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		vfm_debug(LOG, "wake read: %s", strerror(errno));
	pthread_mutex_lock(&c->lock);
	ev = c->ev_head;
	c->ev_head = NULL;
	c->ev_tail = &c->ev_head;
	c->nev = 0;
	pthread_mutex_unlock(&c->lock);
	for (; ev; ev = next) {
		next = ev->next;
		/* Only a negotiated client gets events (the protocol's rule). */
		if (c->negotiated)
			send_text(c, ev->line);
		free(ev->line);
		free(ev);
	}
}

/* ---- Commands ---- */

typedef int (*cmd_fn)(struct control *c, json_object *args, json_object **ret,
		      struct vfm_error *err);

static int cmd_migrate(struct control *c, json_object *args, json_object **ret,
		       struct vfm_error *err)
{
	json_object *uri = NULL, *pc = NULL;

	if (!json_object_object_get_ex(args, "uri", &uri) ||
	    !json_object_is_type(uri, json_type_string))
		return vfm_error_set(err, -EINVAL, "Parameter 'uri' is missing or not a string");
	if (json_object_object_get_ex(args, "postcopy", &pc) &&
	    !json_object_is_type(pc, json_type_boolean))
		return vfm_error_set(err, -EINVAL, "Parameter 'postcopy' must be true or false");
	return vm_migrate(c->vm, json_object_get_string(uri), pc && json_object_get_boolean(pc),
			  err);
}

static int cmd_migrate_cancel(struct control *c, json_object *args, json_object **ret,
			      struct vfm_error *err)
{
	vm_migrate_cancel(c->vm);
	return 0;
}

static int cmd_query_migrate(struct control *c, json_object *args, json_object **ret,
			     struct vfm_error *err)
{
	*ret = vm_query_migrate(c->vm);
	return 0;
}

static int cmd_query_status(struct control *c, json_object *args, json_object **ret,
			    struct vfm_error *err)
{
	*ret = vm_query_status(c->vm);
	return 0;
}

static int cmd_set_params(struct control *c, json_object *args, json_object **ret,
			  struct vfm_error *err)
{
	return vm_set_params(c->vm, args, err);
}

static int cmd_query_params(struct control *c, json_object *args, json_object **ret,
			    struct vfm_error *err)
{
	*ret = vm_query_params(c->vm);
	return 0;
}

static int cmd_stop(struct control *c, json_object *args, json_object **ret,
		    struct vfm_error *err)
{
	return vm_stop(c->vm, err);
}

static int cmd_cont(struct control *c, json_object *args, json_object **ret,
		    struct vfm_error *err)
{
	return vm_cont(c->vm, err);
}

static int cmd_quit(struct control *c, json_object *args, json_object **ret,
		    struct vfm_error *err)
{
	c->quit = true;
	return 0;
}

static int cmd_query_vfiomig(struct control *c, json_object *args, json_object **ret,
			     struct vfm_error *err)
{
	*ret = vm_query_vfiomig(c->vm);
	return 0;
}

static int cmd_guest_verify(struct control *c, json_object *args, json_object **ret,
			    struct vfm_error *err)
{
	return vm_guest_verify(c->vm, ret, err);
}

static const char *const migrate_args[] = { "uri", "postcopy", NULL };
static const char *const no_args[] = { NULL };

static const struct {
	const char *name;
	const char *const *args;     /* allowed argument names; NULL: the command checks */
	cmd_fn fn;
} commands[] = {
	{ "migrate", migrate_args, cmd_migrate },
	{ "migrate_cancel", no_args, cmd_migrate_cancel },
	{ "query-migrate", no_args, cmd_query_migrate },
	{ "query-status", no_args, cmd_query_status },
	{ "migrate-set-parameters", NULL, cmd_set_params },
	{ "query-migrate-parameters", no_args, cmd_query_params },
	{ "stop", no_args, cmd_stop },
	{ "cont", no_args, cmd_cont },
	{ "quit", no_args, cmd_quit },
	{ "query-vfiomig", no_args, cmd_query_vfiomig },
	{ "guest-verify", no_args, cmd_guest_verify },
};

static bool arg_allowed(const char *const *allowed, const char *key)
{
	for (; *allowed; allowed++)
		if (!strcmp(*allowed, key))
			return true;
	return false;
}

static void execute(struct control *c, const char *name, json_object *args, json_object *id)
{
	struct vfm_error err = { 0 };
	json_object *ret = NULL;
	char desc[VFM_ERROR_MSG_MAX + 64];

	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (strcmp(commands[i].name, name))
			continue;
		if (commands[i].args) {
			json_object_object_foreach(args, key, val) {
				(void)val;
				if (!arg_allowed(commands[i].args, key)) {
					snprintf(desc, sizeof(desc), "Parameter '%s' is unexpected", key);
					reply_error(c, id, "GenericError", desc);
					return;
				}
			}
		}
		vfm_debug(LOG, "execute %s", name);
		if (commands[i].fn(c, args, &ret, &err)) {
			json_object_put(ret);
			reply_error(c, id, "GenericError", err.msg[0] ? err.msg : vfm_strerror(err.code));
			return;
		}
		reply_return(c, id, ret);
		return;
	}
	snprintf(desc, sizeof(desc), "The command %s has not been found", name);
	reply_error(c, id, "CommandNotFound", desc);
}

static void handle_line(struct control *c, const char *line)
{
	enum json_tokener_error jerr = json_tokener_success;
	json_object *req, *exec = NULL, *args = NULL, *id = NULL, *empty = NULL;
	char desc[160];
	const char *name;

	if (line[strspn(line, " \t\r")] == '\0')
		return;   /* blank lines are allowed between requests */
	req = json_tokener_parse_verbose(line, &jerr);
	if (!req && jerr != json_tokener_success) {
		snprintf(desc, sizeof(desc), "JSON parse error: %s", json_tokener_error_desc(jerr));
		reply_error(c, NULL, "GenericError", desc);
		return;
	}
	if (!json_object_is_type(req, json_type_object)) {
		reply_error(c, NULL, "GenericError", "Expected 'object' in QMP input");
		json_object_put(req);
		return;
	}
	json_object_object_get_ex(req, "id", &id);
	if (!json_object_object_get_ex(req, "execute", &exec) ||
	    !json_object_is_type(exec, json_type_string)) {
		reply_error(c, id, "GenericError", "QMP input lacks member 'execute' (a string)");
		goto out;
	}
	if (json_object_object_get_ex(req, "arguments", &args) &&
	    !json_object_is_type(args, json_type_object)) {
		reply_error(c, id, "GenericError", "QMP input member 'arguments' must be an object");
		goto out;
	}
	name = json_object_get_string(exec);
	if (!strcmp(name, "qmp_capabilities")) {
		if (c->negotiated)
			reply_error(c, id, "CommandNotFound",
				    "Capabilities negotiation is already complete, command ignored");
		else if (args && json_object_object_length(args))
			reply_error(c, id, "GenericError", "qmp_capabilities takes no arguments here");
		else {
			c->negotiated = true;
			reply_return(c, id, NULL);
		}
		goto out;
	}
	if (!c->negotiated) {
		reply_error(c, id, "CommandNotFound",
			    "Expecting capabilities negotiation with 'qmp_capabilities'");
		goto out;
	}
	if (!args)
		args = empty = json_object_new_object();
	execute(c, name, args, id);
out:
	json_object_put(empty);
	json_object_put(req);
}

/* ---- Input ---- */

static void read_client(struct control *c)
{
	ssize_t n;

	for (;;) {
		n = recv(c->client_fd, c->in + c->in_len, LINE_MAX_BYTES - c->in_len, MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (n <= 0) {
			drop_client(c, n ? strerror(errno) : "end of file");
			return;
		}
		c->in_len += (size_t)n;
		for (;;) {
			char *nl = memchr(c->in, '\n', c->in_len);
			size_t used;

			if (!nl)
				break;
			*nl = '\0';
			used = (size_t)(nl - c->in) + 1;
			if (c->discarding)
				c->discarding = false;   /* the end of the overlong line */
			else if (memchr(c->in, '\0', used - 1))
				/* The parser would see only what precedes it. */
				reply_error(c, NULL, "GenericError", "line contains a NUL byte: ignored");
			else
				handle_line(c, c->in);
			/* After quit nothing more runs: the VM is on its way out. */
			if (c->client_fd < 0 || c->quit)
				return;
			memmove(c->in, c->in + used, c->in_len - used);
			c->in_len -= used;
		}
		if (c->in_len == LINE_MAX_BYTES) {
			if (!c->discarding)
				reply_error(c, NULL, "GenericError", "line longer than 64 KiB: ignored");
			c->discarding = true;
			c->in_len = 0;
		}
	}
}

static void accept_client(struct control *c)
{
	json_object *g, *q, *v;
	int fd = accept4(c->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);

	if (fd < 0)
		return;   /* gone already, or EAGAIN: nothing to do */
	c->client_fd = fd;
	c->negotiated = c->discarding = false;
	c->in_len = c->out_len = 0;
	vfm_debug(LOG, "client connected");
	g = json_object_new_object();
	q = json_object_new_object();
	v = json_object_new_object();
	json_object_object_add(v, "vfiomig", json_object_new_string(vfm_version()));
	json_object_object_add(q, "version", v);
	json_object_object_add(q, "capabilities", json_object_new_array());
	json_object_object_add(g, "QMP", q);
	send_object(c, g);
}

unsigned control_poll_fds(struct control *c, struct pollfd *pfd, unsigned max)
{
	unsigned n = 0;

	if (max < 2)
		return 0;
	pfd[n++] = (struct pollfd){ .fd = c->wake_fd, .events = POLLIN };
	/* One client at a time: the next waits in the backlog. */
	if (c->client_fd < 0)
		pfd[n++] = (struct pollfd){ .fd = c->listen_fd, .events = POLLIN };
	else
		pfd[n++] = (struct pollfd){ .fd = c->client_fd,
					    .events = POLLIN | (c->out_len ? POLLOUT : 0) };
	return n;
}

void control_poll_handle(struct control *c, const struct pollfd *pfd, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		if (!pfd[i].revents)
			continue;
		if (pfd[i].fd == c->wake_fd) {
			drain_events(c);
		} else if (pfd[i].fd == c->listen_fd) {
			accept_client(c);
		} else if (pfd[i].fd == c->client_fd) {
			if (pfd[i].revents & POLLOUT)
				try_write(c);
			if (c->client_fd >= 0 && (pfd[i].revents & (POLLIN | POLLHUP | POLLERR)))
				read_client(c);
		}
	}
}

bool control_quit_requested(const struct control *c)
{
	return c->quit;
}

void control_flush(struct control *c, int timeout_ms)
{
	struct timespec t0, t;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	drain_events(c);
	while (c->client_fd >= 0 && c->out_len) {
		struct pollfd p = { .fd = c->client_fd, .events = POLLOUT };
		long el;

		clock_gettime(CLOCK_MONOTONIC, &t);
		el = (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000;
		if (el >= timeout_ms || poll(&p, 1, (int)(timeout_ms - el)) <= 0)
			return;
		try_write(c);
	}
}

/* ---- Listening ---- */

static int check_parent(const char *path, struct vfm_error *err)
{
	char buf[PATH_MAX];
	struct stat st;
	const char *dir;

	snprintf(buf, sizeof(buf), "%s", path);
	dir = dirname(buf);
	if (stat(dir, &st))
		return vfm_error_set(err, -errno, "control socket directory %s: %s", dir,
				     strerror(errno));
	if (st.st_uid != geteuid() && st.st_uid != 0)
		return vfm_error_set(err, -EPERM, "refusing a control socket in %s: the directory "
				     "belongs to another user", dir);
	if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX))
		return vfm_error_set(err, -EPERM, "refusing a control socket in %s: others may "
				     "write the directory (and it has no sticky bit)", dir);
	return 0;
}

static int prepare_path(const char *path, struct vfm_error *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd, r;

	if (lstat(path, &st)) {
		if (errno == ENOENT)
			return 0;
		return vfm_error_set(err, -errno, "control socket %s: %s", path, strerror(errno));
	}
	if (S_ISLNK(st.st_mode))
		return vfm_error_set(err, -ELOOP, "refusing control socket %s: it is a symbolic link",
				     path);
	if (!S_ISSOCK(st.st_mode))
		return vfm_error_set(err, -EEXIST, "control socket %s: a file that is not a socket "
				     "is in the way", path);
	/* A socket: in use by a live VM, or left behind by a dead one. */
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return vfm_error_set(err, -errno, "socket: %s", strerror(errno));
	r = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
	close(fd);
	if (r == 0)
		return vfm_error_set(err, -EADDRINUSE, "control socket %s is in use by another "
				     "process", path);
	if (unlink(path))
		return vfm_error_set(err, -errno, "removing the stale socket %s: %s", path,
				     strerror(errno));
	return 0;
}

int control_open(const char *path, struct vm *vm, struct control **out, struct vfm_error *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct control *c;
	struct stat st;
	mode_t old;
	int fd, r;

	if (!path || !*path || strlen(path) >= sizeof(sa.sun_path))
		return vfm_error_set(err, -ENAMETOOLONG, "control socket path empty or longer than "
				     "%zu bytes", sizeof(sa.sun_path) - 1);
	if ((r = check_parent(path, err)) || (r = prepare_path(path, err)))
		return r;
	/*
	 * Bound in place (so /proc/net/unix names the path, which is how a
	 * parent can tell the socket listens without connecting) and created
	 * 0600 from the start. A client that meets the instant between bind and
	 * listen gets ECONNREFUSED: ctl retries that briefly.
	 */
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return vfm_error_set(err, -errno, "socket: %s", strerror(errno));
	old = umask(0177);
	r = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	umask(old);
	if (!r && listen(fd, 8)) {
		int e = errno;

		unlink(path);
		errno = e;
		r = -1;
	}
	if (r || lstat(path, &st)) {
		r = -errno;
		close(fd);
		return vfm_error_set(err, r, "listening on %s: %s", path, strerror(-r));
	}
	c = calloc(1, sizeof(*c));
	if (!c || !(c->in = malloc(LINE_MAX_BYTES + 1))) {
		free(c);
		close(fd);
		unlink(path);
		return vfm_error_set(err, -ENOMEM, "out of memory");
	}
	snprintf(c->path, sizeof(c->path), "%s", path);
	c->vm = vm;
	c->listen_fd = fd;
	c->sock_ino = st.st_ino;
	c->client_fd = -1;
	c->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	pthread_mutex_init(&c->lock, NULL);
	c->ev_tail = &c->ev_head;
	if (c->wake_fd < 0) {
		r = -errno;
		control_close(c);
		return vfm_error_set(err, r, "eventfd: %s", strerror(-r));
	}
	vfm_info(LOG, "listening on %s", path);
	*out = c;
	return 0;
}

void control_close(struct control *c)
{
	struct stat st;
	struct ctl_event *ev, *next;

	if (!c)
		return;
	drop_client(c, "closing");
	/* Only the socket we made: another VM may have taken the path since. */
	if (!lstat(c->path, &st) && S_ISSOCK(st.st_mode) && st.st_ino == c->sock_ino)
		unlink(c->path);
	if (c->listen_fd >= 0)
		close(c->listen_fd);
	if (c->wake_fd >= 0)
		close(c->wake_fd);
	for (ev = c->ev_head; ev; ev = next) {
		next = ev->next;
		free(ev->line);
		free(ev);
	}
	pthread_mutex_destroy(&c->lock);
	free(c->in);
	free(c->out);
	free(c);
}

/* ---- Detached (tests, fuzzing) ---- */

int control_open_detached(struct vm *vm, struct control **out)
{
	struct control *c = calloc(1, sizeof(*c));

	if (!c)
		return -ENOMEM;
	c->vm = vm;
	c->listen_fd = c->client_fd = c->wake_fd = -1;
	c->capture = true;
	pthread_mutex_init(&c->lock, NULL);
	c->ev_tail = &c->ev_head;
	*out = c;
	return 0;
}

char *control_handle_line(struct control *c, const char *line)
{
	char *r;

	c->out_len = 0;
	/* The framing's bound: a longer line never reaches the parser. */
	if (strlen(line) >= LINE_MAX_BYTES)
		reply_error(c, NULL, "GenericError", "line longer than 64 KiB: ignored");
	else
		handle_line(c, line);
	r = malloc(c->out_len + 1);
	if (r) {
		if (c->out_len)
			memcpy(r, c->out, c->out_len);
		r[c->out_len] = '\0';
	}
	c->out_len = 0;
	return r;
}
