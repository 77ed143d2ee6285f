/*
 * Internals of the synthetic guest shared by guest_synthetic.c (vCPUs, page
 * writes, verification) and guest_synth_dma.c (its driver for `dma` devices).
 *
 * Guest memory layout (region 0, page = the memory's page size):
 *   [0, table_pages)        u64 per page: a data page's generation, or a DMA
 *                           target page's TAG(source page, generation)
 *   sb_page                 the superblock: layout and each device's ring state
 *   per dma device d        a ring page (64 descriptors), then DMA_TARGETS
 *                           pages the device writes by DMA
 *   [data_start, npages)    data pages the vCPUs write; vCPU i owns
 *                           data_start + i, + i + n, ...
 * Everything the guest needs after a migration is in guest memory.
 */
#ifndef VFM_VMM_SYNTH_H
#define VFM_VMM_SYNTH_H

#include <pthread.h>
#include <stdatomic.h>

#include "vfiomig/device.h"
#include "vmm/guest.h"

#define SYNTH_MAX_VCPUS 64
#define SYNTH_MAX_DMA 16
#define SYNTH_RING_ENTRIES 64     /* one 4 KiB page of 64-byte descriptors */
#define SYNTH_DMA_TARGETS 32      /* pages per device its DMA rewrites */
#define SYNTH_SB_MAGIC 0x31544e5953564656ull  /* "VFVSYNT1" */

/* A table entry with bit 63 set: the page holds a copy of page src at gen. */
#define SYNTH_TAG (1ull << 63)
#define SYNTH_TAG_MAKE(src, gen) (SYNTH_TAG | ((uint64_t)(src) << 32) | ((gen) & 0xffffffffull))
#define SYNTH_TAG_SRC(t) (((t) >> 32) & 0x7fffffffull)
#define SYNTH_TAG_GEN(t) ((t) & 0xffffffffull)

/* The superblock, in guest memory. */
struct synth_sb_dev {
	uint64_t tail;          /* descriptors handed to the device (free-running) */
	uint64_t ops;           /* copy operations completed */
	uint64_t ring_gpa;
	uint64_t mem_size;      /* the device's memory, as read at setup */
};
struct synth_sb {
	uint64_t magic;
	uint64_t page_size, npages, ndma, targets, data_start;
	struct synth_sb_dev dev[SYNTH_MAX_DMA];
};

struct synth;

struct synth_vcpu {
	struct synth *s;
	unsigned index;
	pthread_t thread;
	bool thread_live;
	uint64_t rng;
	uint64_t since_dma;     /* page writes since this vCPU last drove its devices */
	uint64_t kick_seen;     /* the last kick acknowledged (s->kick); under s->lock */
};

struct synth {
	struct vfm_guest g;
	/* Never change after creation. */
	uint64_t page_size;
	uint64_t npages;        /* all guest pages of region 0 */
	uint64_t table_pages;   /* pages holding the generation table */
	uint64_t sb_page, dma_base, data_start;
	unsigned nvcpus;
	uint64_t dirty_rate;
	char *base;             /* region 0 host mapping */
	_Atomic uint64_t *table;
	struct synth_sb *sb;
	unsigned ndma;
	struct vfm_device *dma[SYNTH_MAX_DMA];

	/* Set while every vCPU is parked (creation, start, verify). */
	bool attached;          /* the superblock was checked (destination) or written */
	bool sb_ok;             /* it describes this guest: vCPUs may drive devices */
	char sb_why[160];
	/* Written by the vCPU that owns the device only. */
	bool dma_dead[SYNTH_MAX_DMA];

	_Atomic uint64_t page_writes, dma_ops, dma_errors;
	_Atomic unsigned throttle;   /* auto-converge: percent of vCPU time withheld */

	pthread_mutex_t lock;
	pthread_cond_t cond;
	/* Guarded by lock. */
	bool run;               /* vCPUs may write */
	bool quit;
	unsigned parked;        /* vCPUs waiting for run */
	uint64_t kick;          /* kicks so far (synth_kick_ns) */
	struct synth_vcpu vcpu[SYNTH_MAX_VCPUS];
};

/* Page contents (guest_synthetic.c says how they are made). */
#define SYNTH_WORD_MUL 0x9e3779b97f4a7c15ull
uint64_t synth_page_base(uint64_t p, uint64_t gen);
/* Whether words w[0..words) are page p at gen; else the first bad word. */
bool synth_page_matches(const uint64_t *w, uint64_t words, uint64_t p, uint64_t gen,
			uint64_t *bad_word);
void synth_mark(struct synth *s, uint64_t gpa, uint64_t len);

/* guest_synth_dma.c */
/* Fresh guest: writes the superblock and programs each device's ring. */
int synth_dma_setup(struct synth *s, struct vfm_error *err);
/* Incoming guest: checks the superblock that came with memory (sets sb_ok). */
void synth_dma_attach(struct synth *s);
/* vCPU v drives the devices it owns: one copy through each. */
void synth_dma_step(struct synth *s, struct synth_vcpu *v);
/* Checks target pages, ring completions and ring heads; adds to out. */
void synth_dma_verify(struct synth *s, struct vfm_guest_verify *out);

#endif
