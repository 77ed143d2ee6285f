/* vfiomig: live migration of VFIO devices and the VMs that own them. */
#ifndef VFIOMIG_H
#define VFIOMIG_H

#include "vfiomig/common.h"
#include "vfiomig/log.h"
#include "vfiomig/parse.h"
#include "vfiomig/fsm.h"
#include "vfiomig/device.h"
#include "vfiomig/memory.h"
#include "vfiomig/vfu_server.h"
#include "vfiomig/vfio_user.h"
#include "vfiomig/vfio.h"

#define VFIOMIG_VERSION_MAJOR 0
#define VFIOMIG_VERSION_MINOR 1

VFM_EXPORT const char *vfm_version(void);

#endif
