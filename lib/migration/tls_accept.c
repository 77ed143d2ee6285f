/*
 * A TLS listener's handshakes, one thread each, so that a peer that connects
 * and stalls holds back nobody: the real source's handshake runs beside it,
 * and each stalled one ends at its own timeout.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "migration/tls_int.h"
#include "util/logging.h"
#include "util/thread.h"

#define LOG "channel"
/* Handshakes at once; more are refused at the door (a flood, not a source:
 * one migration needs 1 + multifd-channels, at most 256, in sequence). */
#define MAX_INFLIGHT 32
#define MAX_READY 8

struct vfm_tls_acceptor {
	/* Never change after creation. */
	struct vfm_tls *tls;
	int timeout_ms;
	char name[96];               /* the listener, for messages */
	int efd;                     /* eventfd: a handshake finished */
	atomic_bool stop;            /* closing or cancelled: in-flight ones give up */
	atomic_uint refused;
	pthread_mutex_t lock;
	/* Guarded by lock. */
	int ready[MAX_READY];        /* wrapped fds, oldest first */
	unsigned nready, inflight, refs;
};

struct hs_job {
	struct vfm_tls_acceptor *a;
	int fd;
	char peer[80];
};

static void unref(struct vfm_tls_acceptor *a)
{
	unsigned left;

	pthread_mutex_lock(&a->lock);
	left = --a->refs;
	pthread_mutex_unlock(&a->lock);
	if (left)
		return;
	for (unsigned i = 0; i < a->nready; i++)
		close(a->ready[i]);
	close(a->efd);
	vfm_tls_unref(a->tls);
	pthread_mutex_destroy(&a->lock);
	free(a);
}

static void *hs_main(void *arg)
{
	struct hs_job *j = arg;
	struct vfm_tls_acceptor *a = j->a;
	struct vfm_error why = { 0 };
	uint64_t one = 1;
	int fd, ret;

	ret = vfm_tls_wrap(a->tls, j->fd, j->peer, a->timeout_ms, &a->stop, &fd, &why);
	if (ret && ret != VFM_ECANCELED) {
		/* Refused, and the next peer may be the real source. */
		atomic_fetch_add(&a->refused, 1);
		vfm_err(LOG, "refused a migration connection on %s: %s", a->name, why.msg);
	}
	pthread_mutex_lock(&a->lock);
	a->inflight--;
	if (!ret && (atomic_load(&a->stop) || a->nready == MAX_READY)) {
		close(fd);
	} else if (!ret) {
		a->ready[a->nready++] = fd;
		if (write(a->efd, &one, sizeof(one)) < 0)
			vfm_debug(LOG, "eventfd: %s", strerror(errno));
	}
	pthread_mutex_unlock(&a->lock);
	unref(a);
	free(j);
	return NULL;
}

int vfm__tls_acceptor_new(struct vfm_tls *t, int timeout_ms, const char *name,
			  struct vfm_tls_acceptor **out, struct vfm_error *err)
{
	struct vfm_tls_acceptor *a = calloc(1, sizeof(*a));

	if (!a)
		return vfm_error_set(err, -ENOMEM, "allocating a TLS acceptor");
	a->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (a->efd < 0) {
		free(a);
		return vfm_error_set(err, -errno, "eventfd: %s", strerror(errno));
	}
	pthread_mutex_init(&a->lock, NULL);
	a->tls = t;
	a->timeout_ms = timeout_ms;
	a->refs = 1;
	snprintf(a->name, sizeof(a->name), "%s", name);
	*out = a;
	return 0;
}

void vfm__tls_acceptor_add(struct vfm_tls_acceptor *a, int fd, const char *peer)
{
	struct hs_job *j = calloc(1, sizeof(*j));
	pthread_attr_t attr;
	pthread_t th;
	bool full;

	pthread_mutex_lock(&a->lock);
	full = a->inflight >= MAX_INFLIGHT;
	if (j && !full) {
		a->inflight++;
		a->refs++;
	}
	pthread_mutex_unlock(&a->lock);
	if (!j || full) {
		atomic_fetch_add(&a->refused, 1);
		vfm_err(LOG, "refused a migration connection on %s: %s: %s", a->name, peer,
			full ? "too many TLS handshakes in progress" : "out of memory");
		close(fd);
		free(j);
		return;
	}
	j->a = a;
	j->fd = fd;
	snprintf(j->peer, sizeof(j->peer), "%s", peer);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (vfm_thread_create(&th, &attr, hs_main, j)) {
		pthread_mutex_lock(&a->lock);
		a->inflight--;
		a->refs--;
		pthread_mutex_unlock(&a->lock);
		vfm_err(LOG, "refused a migration connection on %s: %s: no thread", a->name, peer);
		atomic_fetch_add(&a->refused, 1);
		close(fd);
		free(j);
	}
	pthread_attr_destroy(&attr);
}

int vfm__tls_acceptor_fd(const struct vfm_tls_acceptor *a)
{
	return a->efd;
}

bool vfm__tls_acceptor_take(struct vfm_tls_acceptor *a, int *fd)
{
	uint64_t v;
	bool got = false;

	pthread_mutex_lock(&a->lock);
	if (a->nready) {
		*fd = a->ready[0];
		memmove(a->ready, a->ready + 1, --a->nready * sizeof(a->ready[0]));
		got = true;
	}
	if (!a->nready && read(a->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
		vfm_debug(LOG, "eventfd: %s", strerror(errno));
	pthread_mutex_unlock(&a->lock);
	return got;
}

void vfm__tls_acceptor_cancel(struct vfm_tls_acceptor *a)
{
	atomic_store(&a->stop, true);
}

unsigned vfm__tls_acceptor_refused(const struct vfm_tls_acceptor *a)
{
	return atomic_load(&a->refused);
}

void vfm__tls_acceptor_free(struct vfm_tls_acceptor *a)
{
	if (!a)
		return;
	atomic_store(&a->stop, true);   /* handshakes in flight end within 200 ms */
	unref(a);
}
