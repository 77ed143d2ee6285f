/* Threads that take no process signals (thread.h). */
#include <signal.h>

#include "thread.h"

int vfm_thread_create(pthread_t *thread, const pthread_attr_t *attr,
		      void *(*fn)(void *), void *arg)
{
	sigset_t all, old;
	int ret;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, &old);
	ret = pthread_create(thread, attr, fn, arg);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return ret;
}
