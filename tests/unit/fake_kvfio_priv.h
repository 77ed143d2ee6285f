/* Internals of the fake kernel VFIO, shared by fake_kvfio.c and fake_kvfio_ioctl.c. */
#ifndef VFM_TESTS_FAKE_KVFIO_PRIV_H
#define VFM_TESTS_FAKE_KVFIO_PRIV_H

#include <sys/types.h>

#include "compat/vfio_compat.h"
#include "compat/iommufd_compat.h"
#include "fake_kvfio.h"

#define PG 4096u
#define MAX_OBJS 32
#define MAX_MAPS 64
#define REC_MAGIC 0x564b4146u   /* "FAKV" */
#define REC_HDR 1u
#define REC_DATA 2u
#define REC_END 3u
#define REGION_SHIFT 40
#define NREGIONS 9u
#define NIRQS 5u
#define MSI_CAP 0x40

enum obj_kind { O_DEV, O_IOMMUFD, O_CONTAINER, O_GROUP, O_DATA };

struct obj {
	int fd;                /* a real eventfd: unique numbers, real poll() */
	enum obj_kind kind;
	unsigned session;      /* O_DATA: the session it belongs to */
	bool granted;          /* O_DEV: bound (cdev) or from a group */
	bool nonblock;         /* O_DATA: O_NONBLOCK set by fcntl */
};

struct rec {
	uint32_t magic, type;
	uint64_t arg, len;
};

struct fmap {
	uint64_t iova, size;
	uint8_t *va;
	uint64_t *dirty;       /* IOMMU dirty bits, 4 KiB pages */
};

struct lrange {
	uint64_t iova, len;
	uint64_t *bits;        /* DMA log, log_pg pages */
};

struct fake_kvfio {
	struct fake_kvfio_cfg cfg;
	struct vfm_vfio_sys sys;
	struct obj objs[MAX_OBJS];
	unsigned nobjs;
	uint32_t next_id;

	/* Device. */
	enum vfm_state state;
	uint8_t *mem;
	uint64_t npages;
	uint8_t cfgsp[256], cfgmask[256];
	uint8_t *bar0;             /* PG bytes of bar0_fd (a memfd): mmap()able */
	int bar0_fd;
	uint32_t devid;

	/* IOMMU. */
	uint32_t ioas, hwpt;
	bool hwpt_dirty, attached, attached_hwpt, legacy, group_set, iommu_set;
	struct fmap maps[MAX_MAPS];
	unsigned nmaps;
	bool iommu_dirty;

	/* Session: one at a time. */
	unsigned session;      /* 0: none */
	bool saving, loading, ready, hdr_sent, end_sent;
	uint64_t stall_from_ms;      /* first read/write of the session; 0: none yet */
	uint64_t next_page;
	uint8_t *dirty, *produced;   /* per page, saving */
	uint8_t recbuf[sizeof(struct rec) + PG];
	size_t rec_len, rec_off;
	bool rec_initial;
	uint8_t *lbuf;
	size_t llen, lcap;

	/* DMA logging. */
	bool logging;
	uint64_t log_pg;
	struct lrange lr[VFM_VFIO_LOG_MAX_RANGES];
	uint32_t nlr;

	struct { unsigned long req; uint32_t feature; unsigned skip; int err; bool on; } inj;
	struct { enum vfm_state from, to, lands; int err; bool on; } arcfail;
	struct fake_kvfio_stats st;
};


struct obj *fkv_obj_of(struct fake_kvfio *fk, int fd);
int fkv_obj_new(struct fake_kvfio *fk, enum obj_kind kind);
int fkv_set_state(struct fake_kvfio *fk, struct vfio_device_feature_mig_state *s);
int fkv_log_start(struct fake_kvfio *fk, struct vfio_device_feature_dma_logging_control *c);
int fkv_log_report(struct fake_kvfio *fk, struct vfio_device_feature_dma_logging_report *q);
void fkv_end_session(struct fake_kvfio *fk);
int fkv_map_add(struct fake_kvfio *fk, uint64_t iova, uint64_t size, uint64_t va);
int fkv_map_remove(struct fake_kvfio *fk, uint64_t iova, uint64_t len, uint64_t *done);
int fkv_dirty_collect(struct fake_kvfio *fk, uint64_t iova, uint64_t len, uint64_t pg,
			 uint64_t *out, bool keep);
void fkv_precopy_sizes(const struct fake_kvfio *fk, uint64_t *init, uint64_t *dirty);
void fkv_log_free(struct fake_kvfio *fk);
void fkv_maps_clear(struct fake_kvfio *fk);
int fkv_ioctl(void *o, int fd, unsigned long req, void *arg);

#endif
