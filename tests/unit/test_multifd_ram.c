/*
 * RAM over the multifd channels, destination side, against a hand-written
 * source: the test writes the main stream and the channels record by record,
 * so it can send what a real source never would (duplicates, gaps, extra or
 * missing packets, pages on main or on the wrong channel) and check the
 * destination refuses each with a clear error, and that the versions of a
 * page, which always travel on its chunk's channel, land in order.
 */
#include <inttypes.h>
#include <pthread.h>
#include <sys/stat.h>

#include "harness.h"
#include "migration/channel.h"
#include "migration/engine.h"
#include "migration/multifd.h"
#include "vfiomig/memory.h"
#include "vfiomig/migration.h"

#define PG 4096ull
#define MEM (4ull << 20)   /* 4 chunks of 256 pages: 0 and 2 on channel 0, 1 and 3 on 1 */
#define C1 256u            /* the first page of chunk 1 (channel 1) */
#define NCH 2u
#define ID 0x1234567890abcdefull

struct fake {
	char dir[64], uri[128];
	struct vfm_guest_mem *mem;
	struct vfm_migration *m;
	pthread_t dest;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	bool listening;
	int dret;
	struct vfm_error derr;
	int fd, chfd[NCH];
	struct vfm_stream *out, *rp, *ch[NCH];
};

static void on_ready(void *opaque, const char *uri)
{
	struct fake *f = opaque;

	(void)uri;
	pthread_mutex_lock(&f->lock);
	f->listening = true;
	pthread_cond_broadcast(&f->cond);
	pthread_mutex_unlock(&f->lock);
}

static void *dest_main(void *arg)
{
	struct fake *f = arg;
	struct vfm_migration_params p;

	vfm_migration_params_default(&p);
	p.timeout_ms = 1000;
	f->dret = vfm_migration_incoming(f->m, f->uri, &p, on_ready, f, &f->derr);
	return NULL;
}

static struct vfm_stream *open_out(int fd)
{
	struct vfm_stream *s = NULL;
	struct vfm_error err = { 0 };

	if (vfm_stream_open(fd, 2000, &s, &err))
		FAIL("stream: %s", err.msg);
	return s;
}

/* Destination up; main connected with SECTION ram and its layout; NCH
 * channels announced, connected and greeted. */
static void fake_start(struct fake *f)
{
	struct vfm_error err = { 0 };
	struct vfm_uri u;
	unsigned char b[64];

	memset(f, 0, sizeof(*f));
	strcpy(f->dir, "/tmp/vfm-mfram-XXXXXX");
	CHECK(mkdtemp(f->dir) != NULL);
	snprintf(f->uri, sizeof(f->uri), "unix:%s/mig.sock", f->dir);
	pthread_mutex_init(&f->lock, NULL);
	pthread_cond_init(&f->cond, NULL);
	CHECK_EQ(vfm_guest_mem_new(PG, &f->mem, &err), 0);
	CHECK_EQ(vfm_guest_mem_add(f->mem, 0, MEM, "ram", &err), 0);
	CHECK_EQ(vfm_migration_new(f->mem, NULL, NULL, &f->m, &err), 0);
	CHECK_EQ(pthread_create(&f->dest, NULL, dest_main, f), 0);
	pthread_mutex_lock(&f->lock);
	while (!f->listening)
		pthread_cond_wait(&f->cond, &f->lock);
	pthread_mutex_unlock(&f->lock);

	CHECK_EQ(vfm_uri_parse(f->uri, &u, &err), 0);
	if (vfm_connect(&u, 2000, &f->fd, &err))
		FAIL("connect: %s", err.msg);
	f->out = open_out(f->fd);
	f->rp = open_out(f->fd);
	vfm_stream_write_header(f->out);
	vfm_put_le32(b, 1);
	vfm_put_le32(b + 4, 1);
	memcpy(b + 8, "ram", 3);
	vfm_stream_put_record(f->out, VFM_REC_SECTION, 0, 1, b, 11);
	/* The layout: one region [0, MEM). */
	vfm_put_le64(b, 0);
	vfm_put_le32(b + 8, 1);
	vfm_put_le32(b + 12, 2);
	vfm_put_le64(b + 16, PG);
	vfm_put_le64(b + 24, 0);
	vfm_put_le64(b + 32, MEM);
	vfm_stream_put_record(f->out, VFM_REC_DATA, 0, 1, b, 40);
	vfm_put_le64(b, ID);
	vfm_put_le32(b + 8, NCH);
	vfm_stream_put_record(f->out, VFM_REC_MF_CHANNELS, 0, 0, b, 12);
	vfm_stream_flush(f->out);
	CHECK_EQ(vfm_stream_error(f->out, NULL), 0);
	for (unsigned i = 0; i < NCH; i++) {
		if (vfm_connect(&u, 2000, &f->chfd[i], &err))
			FAIL("connect channel %u: %s", i, err.msg);
		f->ch[i] = open_out(f->chfd[i]);
		vfm_stream_write_header(f->ch[i]);
		vfm_put_le64(b, ID);
		vfm_put_le32(b + 8, i);
		vfm_put_le32(b + 12, NCH);
		vfm_stream_put_record(f->ch[i], VFM_REC_MF_HELLO, 0, 0, b, 16);
		vfm_stream_flush(f->ch[i]);
		CHECK_EQ(vfm_stream_error(f->ch[i], NULL), 0);
	}
}

static void batch(unsigned char *hdr, uint64_t page, uint32_t npages, bool zero)
{
	vfm_put_le64(hdr, page * PG);
	vfm_put_le32(hdr + 8, npages);
	vfm_put_le32(hdr + 12, zero ? 1 : 0);
}

/* One MF_RAM packet on channel ch: npages pages filled with fill (0: zero run). */
static void ram_pkt(struct fake *f, unsigned ch, uint32_t seq, uint64_t page, uint32_t npages,
		    unsigned char fill)
{
	size_t len = VFM_MF_PKT_HDR + 16 + (fill ? npages * PG : 0);
	unsigned char *b = calloc(1, len);

	CHECK(b);
	vfm_put_le32(b, VFM_MF_VERSION);
	vfm_put_le32(b + 4, seq);
	batch(b + VFM_MF_PKT_HDR, page, npages, !fill);
	memset(b + VFM_MF_PKT_HDR + 16, fill, len - VFM_MF_PKT_HDR - 16);
	vfm_stream_put_record(f->ch[ch], VFM_REC_MF_RAM, 0, 1, b, len);
	vfm_stream_flush(f->ch[ch]);
	CHECK_EQ(vfm_stream_error(f->ch[ch], NULL), 0);
	free(b);
}

/* A pre-copy RAM record on main. */
static void main_pages(struct fake *f, uint64_t page, uint32_t npages, unsigned char fill)
{
	size_t len = 16 + npages * PG;
	unsigned char *b = malloc(len);

	CHECK(b);
	batch(b, page, npages, false);
	memset(b + 16, fill, len - 16);
	vfm_stream_put_record(f->out, VFM_REC_DATA, 0, 1, b, len);
	free(b);
}

static void switchover(struct fake *f)
{
	unsigned char ts[8] = { 0 };

	vfm_stream_put_record(f->out, VFM_REC_SWITCHOVER, 0, 0, ts, sizeof(ts));
	vfm_stream_flush(f->out);
}

static void ram_end(struct fake *f, uint32_t nch, uint32_t c0, uint32_t c1)
{
	unsigned char b[12];

	vfm_put_le32(b, nch);
	vfm_put_le32(b + 4, c0);
	vfm_put_le32(b + 8, c1);
	vfm_stream_put_record(f->out, VFM_REC_DATA, VFM_MF_RAM_END, 1, b, 4 + 4 * (size_t)nch);
	vfm_stream_flush(f->out);
}

static void eos(struct fake *f)
{
	vfm_stream_put_record(f->out, VFM_REC_SECTION_END, 0, 1, NULL, 0);
	vfm_stream_put_record(f->out, VFM_REC_EOS, 0, 0, NULL, 0);
	vfm_stream_flush(f->out);
}

static void fake_free(struct fake *f)
{
	for (unsigned i = 0; i < NCH; i++) {
		vfm_stream_free(f->ch[i]);
		if (f->chfd[i] > 0)
			close(f->chfd[i]);
	}
	vfm_stream_free(f->rp);
	vfm_stream_free(f->out);
	close(f->fd);
	vfm_migration_free(f->m);
	vfm_guest_mem_free(f->mem);
	rmdir(f->dir);
}

/* The destination loaded all (LOADED), resumes on GO (RESUMED) and succeeds. */
static void expect_loaded_and_resumed(struct fake *f)
{
	struct vfm_rec_hdr h;
	const void *pl;

	CHECK_EQ(vfm_stream_get_record(f->rp, &h, &pl, 4096, NULL), 0);
	CHECK_EQ(h.type, VFM_REC_RP_LOADED);
	vfm_stream_put_record(f->out, VFM_REC_GO, 0, 0, NULL, 0);
	vfm_stream_flush(f->out);
	CHECK_EQ(vfm_stream_get_record(f->rp, &h, &pl, 4096, NULL), 0);
	CHECK_EQ(h.type, VFM_REC_RP_RESUMED);
	pthread_join(f->dest, NULL);
	if (f->dret)
		FAIL("destination: %s", f->derr.msg);
}

/* The destination must fail with a message containing what. */
static void expect_fail(struct fake *f, const char *what)
{
	pthread_join(f->dest, NULL);
	fprintf(stderr, "# destination: %d: %s\n", f->dret, f->derr.msg);
	CHECK(f->dret != 0);
	if (!strstr(f->derr.msg, what))
		FAIL("expected '%s' in '%s'", what, f->derr.msg);
	fake_free(f);
}

static const unsigned char *page_at(struct fake *f, uint64_t page)
{
	return vfm_guest_mem_ptr(f->mem, page * PG, PG);
}

static bool page_is(struct fake *f, uint64_t page, unsigned char v)
{
	const unsigned char *p = page_at(f, page);

	for (uint64_t i = 0; i < PG; i++)
		if (p[i] != v)
			return false;
	return true;
}

TEST_TIMEOUT(channel_pages_apply_in_channel_order_and_commit, 30)
{
	struct fake f;

	fake_start(&f);
	/* Pre-copy: two versions of page 5 on its channel; the later one wins. */
	ram_pkt(&f, 0, 0, 5, 1, 0x11);
	ram_pkt(&f, 1, 0, C1 + 10, 2, 0);          /* a zero run */
	ram_pkt(&f, 0, 1, 5, 1, 0x22);
	ram_pkt(&f, 1, 1, C1 + 20, 3, 0x33);
	switchover(&f);
	/* Stop-copy: the final pass, on the same channels. */
	ram_pkt(&f, 0, 2, 2 * C1 + 40, 1, 0x44);
	ram_end(&f, NCH, 3, 2);
	eos(&f);
	expect_loaded_and_resumed(&f);
	CHECK(page_is(&f, 5, 0x22));
	CHECK(page_is(&f, C1 + 10, 0));
	CHECK(page_is(&f, C1 + 11, 0));
	for (uint64_t p = C1 + 20; p < C1 + 23; p++)
		CHECK(page_is(&f, p, 0x33));
	CHECK(page_is(&f, 2 * C1 + 40, 0x44));
	CHECK(page_is(&f, 2 * C1 + 41, 0));
	{
		struct vfm_migration_stats st;

		vfm_migration_get_stats(f.m, &st);
		CHECK_EQ(st.multifd_channels, NCH);
		CHECK_EQ(st.multifd_ram_bytes, 5 * (24 + VFM_MF_PKT_HDR + 16) + 6 * PG);
	}
	fake_free(&f);
}

/*
 * A zero run over destination memory that was a hole of its memfd before the
 * destination populated it is known zero: not read, not written (a first
 * pass of a 256 MiB mostly-zero guest read all of it on both CPUs,
 * docs/performance.md section 8). A zero run over a page a data run wrote
 * must still clear it, and a later data run there must land.
 */
TEST_TIMEOUT(zero_runs_over_fresh_memory_are_not_read, 30)
{
	struct fake f;
	uint64_t read_bytes, known;

	fake_start(&f);
	ram_pkt(&f, 0, 0, 0, 256, 0);              /* chunk 0: never written */
	ram_pkt(&f, 1, 0, C1 + 5, 1, 0x55);
	ram_pkt(&f, 1, 1, C1, 10, 0);              /* over the page just written */
	ram_pkt(&f, 0, 1, 2 * C1 + 3, 2, 0x66);
	ram_pkt(&f, 0, 2, 2 * C1 + 4, 1, 0);       /* half over written pages */
	ram_pkt(&f, 1, 2, C1, 10, 0);              /* known zero again */
	switchover(&f);
	ram_pkt(&f, 1, 3, C1 + 6, 1, 0x77);
	ram_end(&f, NCH, 3, 4);
	eos(&f);
	expect_loaded_and_resumed(&f);
	for (uint64_t p = C1; p < C1 + 10; p++)
		CHECK(page_is(&f, p, p == C1 + 6 ? 0x77 : 0));
	CHECK(page_is(&f, 2 * C1 + 3, 0x66));
	CHECK(page_is(&f, 2 * C1 + 4, 0));
	vfm__ram_dst_zero_stats(f.m->ram, &read_bytes, &known);
	fprintf(stderr, "# zero runs: %" PRIu64 " bytes read, %" PRIu64 " pages known zero\n",
		read_bytes, known);
	CHECK_EQ(read_bytes, 11 * PG);             /* the 10-page run and the 1-page one */
	CHECK_EQ(known, 256 + 10);
	fake_free(&f);
}

/*
 * The RAM end marker's wait (and the drain PING's) is woken by a channel
 * when it reaches the count waited for, not at every packet: per-packet
 * wakeups made the waiting thread and the channel thread take turns on one
 * CPU every 2-3 us (docs/performance.md, section 8). 40 packets per channel
 * arrive after the marker; the wait may wake once per channel (and a spare).
 */
TEST_TIMEOUT(ram_end_wait_wakes_per_channel_not_per_packet, 30)
{
	struct fake f;

	fake_start(&f);
	switchover(&f);
	ram_end(&f, NCH, 40, 40);
	nap_ms(50);      /* the marker waits before the packets come */
	for (uint32_t s = 0; s < 40; s++) {
		ram_pkt(&f, 0, s, s, 1, (unsigned char)(s + 1));
		ram_pkt(&f, 1, s, C1 + s, 1, 0);
	}
	eos(&f);
	expect_loaded_and_resumed(&f);
	CHECK(page_is(&f, 39, 40));
	fprintf(stderr, "# the RAM wait woke %u times for 2 x 40 packets\n", f.m->mf_ram_wakeups);
	CHECK(f.m->mf_ram_wakeups <= NCH + 1);
	fake_free(&f);
}

TEST_TIMEOUT(ram_pages_on_main_refused_while_channels_carry_ram, 30)
{
	struct fake f;

	fake_start(&f);
	main_pages(&f, 5, 1, 0x11);
	vfm_stream_flush(f.out);
	expect_fail(&f, "on the main channel while 2 multifd channels carry RAM");
}

TEST_TIMEOUT(ram_packet_on_the_wrong_channel_refused, 30)
{
	struct fake f;

	fake_start(&f);
	ram_pkt(&f, 1, 0, 5, 1, 0x22);              /* chunk 0 belongs on channel 0 */
	expect_fail(&f, "does not belong on channel 1 of 2");
}

TEST_TIMEOUT(ram_packet_across_two_chunks_refused, 30)
{
	struct fake f;

	fake_start(&f);
	ram_pkt(&f, 0, 0, C1 - 2, 4, 0x22);         /* pages 254..257: chunks 0 and 1 */
	expect_fail(&f, "does not belong on channel 0 of 2");
}

TEST_TIMEOUT(duplicate_ram_packet_refused, 30)
{
	struct fake f;

	fake_start(&f);
	switchover(&f);
	ram_pkt(&f, 0, 0, 5, 1, 0x22);
	ram_pkt(&f, 0, 0, 5, 1, 0x23);
	expect_fail(&f, "multifd channel 0: RAM packet 0 where 1 was due (duplicate)");
}

TEST_TIMEOUT(ram_packet_gap_refused, 30)
{
	struct fake f;

	fake_start(&f);
	switchover(&f);
	ram_pkt(&f, 1, 1, C1 + 5, 1, 0x22);
	expect_fail(&f, "multifd channel 1: RAM packet 1 where 0 was due (one is missing or out "
		    "of order)");
}

TEST_TIMEOUT(missing_ram_packet_times_out, 30)
{
	struct fake f;

	fake_start(&f);
	switchover(&f);
	ram_pkt(&f, 0, 0, 5, 1, 0x22);
	ram_end(&f, NCH, 2, 0);
	expect_fail(&f, "ram: channel 0 applied 1 of 2 RAM packets, no progress");
}

TEST_TIMEOUT(ram_packet_after_the_end_marker_refused, 30)
{
	struct fake f;

	fake_start(&f);
	switchover(&f);
	ram_end(&f, NCH, 0, 0);
	usleep(100000);
	ram_pkt(&f, 0, 0, 5, 1, 0x22);
	/* Either the reader sees the marker first (beyond) or, on a slow
	 * machine, the marker sees the packet applied: both name the marker. */
	expect_fail(&f, "end marker");
}

TEST_TIMEOUT(eos_without_ram_end_marker_refused, 30)
{
	struct fake f;

	fake_start(&f);
	switchover(&f);
	eos(&f);
	expect_fail(&f, "multifd channels but no RAM end marker");
}

TEST_TIMEOUT(ram_end_marker_for_other_channel_count_refused, 30)
{
	struct fake f;

	fake_start(&f);
	switchover(&f);
	ram_end(&f, 1, 0, 0);
	expect_fail(&f, "ram: bad multifd end marker (8 bytes, 1 channels; 2 here)");
}

TEST_TIMEOUT(ram_packet_outside_guest_memory_refused, 30)
{
	struct fake f;

	fake_start(&f);
	switchover(&f);
	ram_pkt(&f, 0, 0, MEM / PG, 1, 0x22);          /* chunk 4: channel 0, past the end */
	expect_fail(&f, "outside guest memory");
}

TEST_TIMEOUT(short_and_unknown_ram_packets_refused, 30)
{
	unsigned char b[VFM_MF_PKT_HDR + 16] = { 0 };
	struct fake f;

	fake_start(&f);
	switchover(&f);
	vfm_put_le32(b, VFM_MF_VERSION);
	vfm_stream_put_record(f.ch[0], VFM_REC_MF_RAM, 0, 1, b, VFM_MF_PKT_HDR + 4);
	vfm_stream_flush(f.ch[0]);
	expect_fail(&f, "multifd channel 0: short RAM packet (16 bytes)");

	fake_start(&f);
	switchover(&f);
	vfm_put_le32(b, 2);
	vfm_stream_put_record(f.ch[1], VFM_REC_MF_RAM, 0, 1, b, sizeof(b));
	vfm_stream_flush(f.ch[1]);
	expect_fail(&f, "multifd channel 1: RAM packet version 2 unknown");

	fake_start(&f);
	switchover(&f);
	vfm_put_le32(b, VFM_MF_VERSION);
	vfm_stream_put_record(f.ch[1], VFM_REC_MF_RAM, 0, 16, b, sizeof(b));
	vfm_stream_flush(f.ch[1]);
	expect_fail(&f, "RAM packet with section 16");
}
