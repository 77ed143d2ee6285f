/* The control-socket client: line framing, greeting, commands, queued events. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "ctl-client.h"

#define LINE_MAX_BYTES (64u << 10)   /* the protocol's bound for one line */
#define EVENT_QUEUE 64

struct ctl_client {
	int fd;
	char path[108];
	char *buf;                /* bytes read, not yet a whole line */
	size_t len;
	bool closed;              /* the server hung up */
	json_object *events[EVENT_QUEUE];
	unsigned nevents;
	char last_class[64];
	unsigned next_id;
};

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int left_ms(long long deadline)
{
	long long l = deadline - now_ms();

	return l < 0 ? 0 : l > 1000000 ? 1000000 : (int)l;
}

/* Reads what is there (waiting until deadline for something). */
static int fill(struct ctl_client *c, long long deadline, struct vfm_error *err)
{
	struct pollfd p = { .fd = c->fd, .events = POLLIN };
	ssize_t n;
	int r;

	if (c->closed)
		return vfm_error_set(err, -ECONNRESET, "the VM closed the control connection");
	r = poll(&p, 1, left_ms(deadline));
	if (r < 0 && errno == EINTR)
		return 0;
	if (r < 0)
		return vfm_error_set(err, -errno, "poll on %s: %s", c->path, strerror(errno));
	if (r == 0)
		return vfm_error_set(err, -ETIMEDOUT, "no answer from the VM at %s", c->path);
	if (c->len >= LINE_MAX_BYTES)
		return vfm_error_set(err, VFM_EPROTOCOL, "the VM sent a line over %u bytes",
				     LINE_MAX_BYTES);
	n = recv(c->fd, c->buf + c->len, LINE_MAX_BYTES - c->len, 0);
	if (n < 0 && (errno == EINTR || errno == EAGAIN))
		return 0;
	if (n < 0 && errno != ECONNRESET)
		return vfm_error_set(err, -errno, "reading %s: %s", c->path, strerror(errno));
	if (n <= 0) {
		c->closed = true;
		return vfm_error_set(err, -ECONNRESET, "the VM closed the control connection");
	}
	c->len += (size_t)n;
	return 0;
}

/* The next whole line as a JSON object, within deadline. */
static int read_object(struct ctl_client *c, long long deadline, json_object **out,
		       struct vfm_error *err)
{
	for (;;) {
		char *nl = memchr(c->buf, '\n', c->len);

		if (nl) {
			size_t llen = (size_t)(nl - c->buf);
			enum json_tokener_error jerr;
			json_object *o;

			*nl = '\0';
			o = json_tokener_parse_verbose(c->buf, &jerr);
			memmove(c->buf, nl + 1, c->len - llen - 1);
			c->len -= llen + 1;
			if (!o || !json_object_is_type(o, json_type_object)) {
				json_object_put(o);
				return vfm_error_set(err, VFM_EPROTOCOL, "the VM sent a line that is "
						     "not a JSON object (%s)", json_tokener_error_desc(jerr));
			}
			*out = o;
			return 0;
		}
		int r = fill(c, deadline, err);
		if (r)
			return r;
	}
}

static void queue_event(struct ctl_client *c, json_object *ev)
{
	if (c->nevents == EVENT_QUEUE) {
		json_object_put(c->events[0]);
		memmove(c->events, c->events + 1, sizeof(c->events[0]) * (EVENT_QUEUE - 1));
		c->nevents--;
	}
	c->events[c->nevents++] = ev;
}

static int send_line(struct ctl_client *c, json_object *o, long long deadline,
		     struct vfm_error *err)
{
	const char *s = json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN);
	size_t len = strlen(s), off = 0;
	char *line = malloc(len + 1);

	if (!line)
		return vfm_error_set(err, -ENOMEM, "out of memory");
	memcpy(line, s, len);
	line[len++] = '\n';
	while (off < len) {
		struct pollfd p = { .fd = c->fd, .events = POLLOUT };
		ssize_t n = send(c->fd, line + off, len - off, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n > 0) {
			off += (size_t)n;
			continue;
		}
		if (n < 0 && errno != EAGAIN && errno != EINTR) {
			int e = errno;
			free(line);
			if (e == EPIPE || e == ECONNRESET)
				return vfm_error_set(err, -ECONNRESET, "the VM closed the control connection");
			return vfm_error_set(err, -e, "writing to %s: %s", c->path, strerror(e));
		}
		if (poll(&p, 1, left_ms(deadline)) == 0) {
			free(line);
			return vfm_error_set(err, -ETIMEDOUT, "the VM at %s takes no input", c->path);
		}
	}
	free(line);
	return 0;
}

static int connect_unix(struct ctl_client *c, const char *path, long long deadline,
			struct vfm_error *err)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd, refused_retries = 0;

	if (strlen(path) >= sizeof(sa.sun_path))
		return vfm_error_set(err, -ENAMETOOLONG, "control socket path too long: %s", path);
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return vfm_error_set(err, -errno, "socket: %s", strerror(errno));
	c->fd = fd;
	for (;;) {
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
			return 0;
		if (errno == EINTR)
			continue;
		/* EAGAIN: a full backlog. ECONNREFUSED: the instant between the
		 * VM's bind and listen, or a dead VM's socket: retried briefly. */
		if ((errno == EAGAIN && left_ms(deadline) > 0) ||
		    (errno == ECONNREFUSED && refused_retries++ < 25)) {
			struct timespec ts = { 0, 20000000 };
			nanosleep(&ts, NULL);
			continue;
		}
		break;
	}
	if (errno == ENOENT)
		return vfm_error_set(err, -ENOENT, "no VM control socket at %s", path);
	if (errno == ECONNREFUSED)
		return vfm_error_set(err, -ECONNREFUSED, "nothing listens on %s (has the VM exited?)",
				     path);
	return vfm_error_set(err, -errno, "connecting to %s: %s", path, strerror(errno));
}

int ctl_connect(const char *path, int timeout_ms, struct ctl_client **out,
		struct vfm_error *err)
{
	long long deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : CTL_DEFAULT_TIMEOUT_MS);
	struct ctl_client *c = calloc(1, sizeof(*c));
	json_object *greeting = NULL, *ret = NULL;
	int r;

	if (!c || !(c->buf = malloc(LINE_MAX_BYTES + 1))) {
		free(c);
		return vfm_error_set(err, -ENOMEM, "out of memory");
	}
	c->fd = -1;
	snprintf(c->path, sizeof(c->path), "%s", path);
	r = connect_unix(c, path, deadline, err);
	if (r)
		goto fail;
	r = read_object(c, deadline, &greeting, err);
	if (r == -ETIMEDOUT) {
		vfm_error_clear(err);
		r = vfm_error_set(err, -ETIMEDOUT, "the VM at %s sent no greeting in %d ms (is "
				  "another client connected? it serves one at a time)", path,
				  timeout_ms > 0 ? timeout_ms : CTL_DEFAULT_TIMEOUT_MS);
	}
	if (r)
		goto fail;
	if (!json_object_object_get_ex(greeting, "QMP", NULL)) {
		r = vfm_error_set(err, VFM_EPROTOCOL, "%s does not speak the control protocol", path);
		goto fail;
	}
	json_object_put(greeting);
	greeting = NULL;
	r = ctl_execute(c, "qmp_capabilities", NULL, left_ms(deadline), &ret, err);
	json_object_put(ret);
	if (r)
		goto fail;
	*out = c;
	return 0;
fail:
	json_object_put(greeting);
	ctl_close(c);
	return r;
}

int ctl_execute(struct ctl_client *c, const char *command, json_object *args,
		int timeout_ms, json_object **ret, struct vfm_error *err)
{
	long long deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : CTL_DEFAULT_TIMEOUT_MS);
	json_object *req = json_object_new_object(), *reply = NULL, *v, *id;
	unsigned my_id = ++c->next_id;
	int r;

	c->last_class[0] = '\0';
	if (ret)
		*ret = NULL;
	json_object_object_add(req, "execute", json_object_new_string(command));
	if (args)
		json_object_object_add(req, "arguments", args);
	json_object_object_add(req, "id", json_object_new_int((int)my_id));
	r = send_line(c, req, deadline, err);
	json_object_put(req);
	while (!r) {
		r = read_object(c, deadline, &reply, err);
		if (r)
			break;
		if (json_object_object_get_ex(reply, "event", NULL)) {
			queue_event(c, reply);
			reply = NULL;
			continue;
		}
		/* A reply to an earlier request that timed out is not ours. */
		if (json_object_object_get_ex(reply, "id", &id) &&
		    json_object_get_int(id) != (int)my_id) {
			json_object_put(reply);
			reply = NULL;
			continue;
		}
		if (json_object_object_get_ex(reply, "return", &v)) {
			if (ret)
				*ret = json_object_get(v);
		} else if (json_object_object_get_ex(reply, "error", &v)) {
			json_object *cls = NULL, *desc = NULL;

			json_object_object_get_ex(v, "class", &cls);
			json_object_object_get_ex(v, "desc", &desc);
			snprintf(c->last_class, sizeof(c->last_class), "%s",
				 cls ? json_object_get_string(cls) : "GenericError");
			r = vfm_error_set(err, -EREMOTEIO, "%s",
					  desc ? json_object_get_string(desc) : "error without a description");
		} else {
			r = vfm_error_set(err, VFM_EPROTOCOL, "reply without return or error: %s",
					  json_object_to_json_string(reply));
		}
		json_object_put(reply);
		break;
	}
	if (r == -ETIMEDOUT) {
		vfm_error_clear(err);
		vfm_error_set(err, r, "no reply to '%s' from the VM at %s within %d ms", command,
			      c->path, timeout_ms > 0 ? timeout_ms : CTL_DEFAULT_TIMEOUT_MS);
	}
	return r;
}

const char *ctl_last_error_class(const struct ctl_client *c)
{
	return c->last_class;
}

int ctl_next_event(struct ctl_client *c, int timeout_ms, json_object **ev, struct vfm_error *err)
{
	long long deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
	json_object *o;
	int r;

	for (;;) {
		if (c->nevents) {
			*ev = c->events[0];
			memmove(c->events, c->events + 1, sizeof(c->events[0]) * (c->nevents - 1));
			c->nevents--;
			return 0;
		}
		r = read_object(c, deadline, &o, err);
		if (r)
			return r;
		if (json_object_object_get_ex(o, "event", NULL))
			queue_event(c, o);
		else
			json_object_put(o);   /* a late reply nobody waits for */
	}
}

int ctl_wait_closed(struct ctl_client *c, int timeout_ms)
{
	long long deadline = now_ms() + timeout_ms;

	while (!c->closed) {
		int r;

		c->len = 0;   /* what comes now (SHUTDOWN) is of no interest */
		r = fill(c, deadline, NULL);
		if (r && !c->closed)
			return r;
	}
	return 0;
}

void ctl_close(struct ctl_client *c)
{
	if (!c)
		return;
	if (c->fd >= 0)
		close(c->fd);
	for (unsigned i = 0; i < c->nevents; i++)
		json_object_put(c->events[i]);
	free(c->buf);
	free(c);
}
