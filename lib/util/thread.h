/* Threads that take no process signals. */
#ifndef VFM_UTIL_THREAD_H
#define VFM_UTIL_THREAD_H

#include <pthread.h>

/*
 * pthread_create with every blockable signal blocked in the new thread (as
 * QEMU's qemu_thread_create): SIGINT/SIGTERM reach the thread whose wait
 * they must cut short (the tools' main loops, which wait without
 * SA_RESTART), never a worker that would swallow the interruption, and a
 * handler never runs on two threads at once. A thread that needs a signal
 * (a vCPU's kick) unblocks it itself. Returns pthread_create's value.
 */
int vfm_thread_create(pthread_t *thread, const pthread_attr_t *attr,
		      void *(*fn)(void *), void *arg);

#endif
