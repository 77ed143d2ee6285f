/* The VM process's main loop: the control socket, device sockets, IRQ
 * eventfds and SIGINT/SIGTERM, in one poll() on the main thread. */
#ifndef VFM_VMM_MAIN_LOOP_H
#define VFM_VMM_MAIN_LOOP_H

#include "vmm/control.h"
#include "vmm/vm.h"

/* Runs until a client sends quit or a signal arrives; returns the signal or 0. */
int vm_main_loop(struct vm *vm, struct control *ctl);

#endif
