/*
 * Multifd: extra channels next to the main one that carry devices' stop-copy
 * state in indexed packets, sent by a save thread per device and loaded in
 * index order by a load thread per device. Design: docs/multifd.md.
 */
#ifndef VFM_MIGRATION_MULTIFD_H
#define VFM_MIGRATION_MULTIFD_H

#include "migration/channel.h"
#include "migration/engine.h"

#define VFM_MF_VERSION 1u
#define VFM_MF_PKT_HDR 12u          /* u32 version, u32 idx, u32 flags */
#define VFM_MF_FLAG_CONFIG 1u       /* the device's config state: the last packet */
#define VFM_MF_MAX_CHANNELS 255u
/* RAM over the channels (docs/multifd.md): MF_RAM packets carry the same
 * 16-byte batch as a RAM DATA record after the packet header; on main, a
 * RAM DATA record with this header flag ends the pass with per-channel
 * packet counts. */
#define VFM_MF_RAM_SECTION 1u
#define VFM_MF_RAM_END 1u
#define VFM_MF_RAM_BATCH 16u

struct vfm_mf_src;
struct vfm_mf_dst;

/*
 * Source. Decides which devices use the channels (md->mf_use) and, if any
 * channel is wanted, announces them on main and connects them. *out is NULL
 * when no channel is used (file:, fd:, 0 channels).
 */
int vfm__mf_src_open(struct vfm_migration *m, const struct vfm_uri *uri,
		     const struct vfm_migration_params *p, struct vfm_stream *main,
		     struct vfm_mf_src **out, struct vfm_error *err);
/* Starts the save threads: each moves its device to STOP_COPY; returns once
 * all did (or one failed). Data flows after vfm__mf_src_go. */
int vfm__mf_src_stop_devices(struct vfm_mf_src *mf, struct vfm_error *err);
/* Before vfm__mf_src_stop_devices: md's stop-copy goes on main after all
 * (md->mf_use cleared); its parked save thread ends unused and no end
 * marker goes for it (the destination needs none for a device without
 * packets on the channels). */
void vfm__mf_src_release(struct vfm_mf_src *mf, struct vfm_mig_device *md);
void vfm__mf_src_go(struct vfm_mf_src *mf);
/* Joins the save threads, then puts each device's end marker on main. */
int vfm__mf_src_finish(struct vfm_mf_src *mf, struct vfm_stream *main, struct vfm_error *err);
/* Packet bytes written on the channels so far (atomic: any thread). */
uint64_t vfm__mf_src_bytes(struct vfm_mf_src *mf);
/* The channels of the current migration (the migration thread), NULL if none. */
struct vfm_mf_src *vfm__mf_src_of(struct vfm_migration *m);
unsigned vfm__mf_src_nchannels(const struct vfm_mf_src *mf);
/* Tests: save threads started and not yet ended (parked until the switchover). */
unsigned vfm__mf_src_savers(struct vfm_mf_src *mf);
/* One MF_RAM packet on channel chan: batch (16 bytes) then plen page bytes
 * (guest memory, which must not change: the guest is stopped). */
int vfm__mf_src_put_ram(struct vfm_mf_src *mf, unsigned chan, const void *batch,
			const void *pages, size_t plen, struct vfm_error *err);
int vfm__mf_src_flush(struct vfm_mf_src *mf, unsigned chan, struct vfm_error *err);
/* MF_RAM packets sent on chan so far. */
uint32_t vfm__mf_src_ram_packets(struct vfm_mf_src *mf, unsigned chan);
/* A thread failed or the migration is cancelled: senders stop. */
bool vfm__mf_src_stopping(struct vfm_mf_src *mf);
void vfm__mf_src_fail(struct vfm_mf_src *mf);
/* Stops and joins everything (safe at any point), closes the channels. */
void vfm__mf_src_close(struct vfm_mf_src *mf);

/* Destination: MF_CHANNELS came on main: accept and check the channels,
 * start readers and load threads. main_fd is shut down if a thread fails. */
int vfm__mf_dst_open(struct vfm_migration *m, struct vfm_listener *l, int main_fd,
		     const struct vfm_migration_params *p, const void *pl, size_t len,
		     struct vfm_mf_dst **out, struct vfm_error *err);
/* Main reached SWITCHOVER: every pre-copy record is loaded, packets may go in. */
void vfm__mf_dst_switchover(struct vfm_mf_dst *mf);
/* A device's end marker: total packets; waits until all are loaded. */
int vfm__mf_dst_dev_end(struct vfm_mig_device *md, uint32_t total, struct vfm_error *err);
/* RAM's end marker (payload: u32 channels, u32 packets per channel): waits
 * until every channel applied exactly that many MF_RAM packets. */
int vfm__mf_dst_ram_end(struct vfm_mf_dst *mf, const void *pl, size_t len, struct vfm_error *err);
/* At EOS: every device that got packets got its end marker, RAM packets had
 * theirs; no thread failed. */
int vfm__mf_dst_check(struct vfm_mf_dst *mf, struct vfm_error *err);
/* The first failure of a channel or load thread, if any (0 otherwise). */
int vfm__mf_dst_error(struct vfm_mf_dst *mf, struct vfm_error *err);
/* Tells the reader and load threads to end (a source closing its channels
 * is then no error); vfm__mf_dst_close joins them. */
void vfm__mf_dst_stop(struct vfm_mf_dst *mf);
void vfm__mf_dst_close(struct vfm_mf_dst *mf);
/* Channels of the incoming migration (0: none, or mf NULL). */
unsigned vfm__mf_dst_nchannels(const struct vfm_mf_dst *mf);
/*
 * The drain PING's channel counts (u32 n, then u32 RAM packets sent on each
 * channel): returns once every channel applied that many, the migration
 * stops or fails, or no packet was applied for a while. Best effort, so
 * never an error: it keeps the channels' backlog out of the downtime.
 */
void vfm__mf_dst_wait_ram(struct vfm_mf_dst *mf, const unsigned char *counts, size_t len);

/* vfio.c: one buffer into the device (config: the PCI config state). */
int vfm__vfio_load_buffer(struct vfm_mig_device *md, bool config, const void *buf, size_t len,
			  struct vfm_error *err);
/*
 * vfio.c: reads the device's config state into md->cfg (0 bytes if it has
 * none). Called with the guest stopped and before the STOP_COPY arc: a device
 * may refuse region access in STOP_COPY (libvfio-user does), and QEMU never
 * reads config from the device at save time either (it sends its own
 * emulated copy, hw/vfio/pci.c vfio_save_device_config_state()).
 */
int vfm__vfio_snapshot_config(struct vfm_mig_device *md, struct vfm_error *err);
uint32_t vfm__vfio_section(const struct vfm_mig_device *md);

/*
 * ram.c: one page batch (16-byte header + pages, no layout) into guest
 * memory. chan < 0: from main, refused while nchan channels carry RAM.
 * From channel chan of nchan: the batch must lie in one 1 MiB chunk that
 * maps to that channel (chunk mod nchan), so a page only ever comes on one
 * channel, in order. Any thread: channels carry disjoint pages.
 */
int vfm__ram_load_batch(struct vfm_ram *ram, const void *buf, size_t len, int chan,
			unsigned nchan, struct vfm_error *err);
/* ram.c: bytes of RAM that went over (source) or came from (destination) the channels. */
uint64_t vfm__ram_mf_transferred(struct vfm_ram *ram);

#endif
