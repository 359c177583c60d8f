/*
 * gpu-blob-test: the guest side of tools/linux-guest. A static program that runs as the
 * only user process in a Linux guest and drives Linux's own virtio-gpu driver
 * (/dev/dri/renderD128) against the hostmem device behind QEMU's vhost-user frontend.
 *
 * Per blob: RESOURCE_CREATE_BLOB (HOST3D, USE_MAPPABLE: the kernel allocates an offset in
 * shared memory region 1 and sends RESOURCE_MAP_BLOB, which the backend places with
 * SHMEM_MAP), DRM_VIRTGPU_MAP + mmap, then
 *   1. host writes, guest reads: SUBMIT_3D FILL with a seed, fence wait, the guest checks
 *      every qword of the pattern through its mapping;
 *   2. host writes from the stream: SUBMIT_3D WRITE of known bytes, the guest checks them;
 *   3. guest writes, host reads: the guest writes its own pattern through the mapping and
 *      reads it back; SUBMIT_3D CHECKSUM makes the host read it. Linux returns no reply
 *      bytes of SUBMIT_3D to user space, so the checksum's value is only checked when the
 *      capset offers op 4 (STORE_CHECKSUM: the host writes the checksum of a range into
 *      the blob, where the guest reads it); otherwise a failed command shows up as a driver
 *      error line in the kernel log, which /init counts.
 * then munmap + GEM_CLOSE (the kernel sends RESOURCE_UNMAP_BLOB and RESOURCE_UNREF).
 * Up to `live` blobs are alive at once, so several placements share the region.
 *
 * The few uapi structs are written out here (Debian 12 ships <drm/virtgpu_drm.h> only in
 * libdrm-dev); their layout is Linux 6.1's include/uapi/drm/virtgpu_drm.h.
 *
 * Prints `GPUTEST ...` progress lines and one `GPUTEST-RESULT {json}` line. Exit status 0
 * only when every blob went through with no mismatch.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* ---- uapi (drm.h / virtgpu_drm.h, Linux 6.1) ---- */
struct drm_gem_close { uint32_t handle, pad; };
struct drm_virtgpu_map { uint64_t offset; uint32_t handle, pad; };
struct drm_virtgpu_execbuffer {
	uint32_t flags, size;
	uint64_t command, bo_handles;
	uint32_t num_bo_handles;
	int32_t fence_fd;
	uint32_t ring_idx, pad;
};
struct drm_virtgpu_getparam { uint64_t param, value; };
struct drm_virtgpu_get_caps { uint32_t cap_set_id, cap_set_ver; uint64_t addr; uint32_t size, pad; };
struct drm_virtgpu_resource_create_blob {
	uint32_t blob_mem, blob_flags, bo_handle, res_handle;
	uint64_t size;
	uint32_t pad, cmd_size;
	uint64_t cmd, blob_id;
};
struct drm_virtgpu_context_set_param { uint64_t param, value; };
struct drm_virtgpu_context_init { uint32_t num_params, pad; uint64_t ctx_set_params; };

_Static_assert(sizeof(struct drm_virtgpu_execbuffer) == 40, "execbuffer layout");
_Static_assert(sizeof(struct drm_virtgpu_resource_create_blob) == 48, "create_blob layout");

#define DRM_COMMAND_BASE 0x40
#define DRM_IOCTL_GEM_CLOSE _IOW('d', 0x09, struct drm_gem_close)
#define VG_IOWR(nr, t) _IOWR('d', DRM_COMMAND_BASE + (nr), t)
#define DRM_IOCTL_VIRTGPU_MAP VG_IOWR(0x01, struct drm_virtgpu_map)
#define DRM_IOCTL_VIRTGPU_EXECBUFFER VG_IOWR(0x02, struct drm_virtgpu_execbuffer)
#define DRM_IOCTL_VIRTGPU_GETPARAM VG_IOWR(0x03, struct drm_virtgpu_getparam)
#define DRM_IOCTL_VIRTGPU_GET_CAPS VG_IOWR(0x09, struct drm_virtgpu_get_caps)
#define DRM_IOCTL_VIRTGPU_RESOURCE_CREATE_BLOB VG_IOWR(0x0a, struct drm_virtgpu_resource_create_blob)
#define DRM_IOCTL_VIRTGPU_CONTEXT_INIT VG_IOWR(0x0b, struct drm_virtgpu_context_init)

#define VIRTGPU_EXECBUF_FENCE_FD_OUT 0x02
#define VIRTGPU_PARAM_3D_FEATURES 1
#define VIRTGPU_PARAM_RESOURCE_BLOB 3
#define VIRTGPU_PARAM_HOST_VISIBLE 4
#define VIRTGPU_PARAM_CONTEXT_INIT 6
#define VIRTGPU_PARAM_SUPPORTED_CAPSET_IDS 7
#define VIRTGPU_BLOB_MEM_HOST3D 0x0002
#define VIRTGPU_BLOB_FLAG_USE_MAPPABLE 0x0001
#define VIRTGPU_CONTEXT_PARAM_CAPSET_ID 0x0001

/* ---- the shm backend's capset and stream (device/src/backend/shm.rs) ---- */
#define SHM_CAPSET_ID 29 /* below 32: Linux 6.1 can only use such ids (see main) */
#define SHM_CAPSET_VERSION 1
#define SHM_CAPSET_SIZE 16
#define OP_FILL 1
#define OP_WRITE 2
#define OP_CHECKSUM 3
#define OP_STORE_CHECKSUM 4 /* see the header comment; used only if offered */

static uint64_t splitmix64(uint64_t z)
{
	z += 0x9e3779b97f4a7c15ULL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}
static uint64_t pattern_qword(uint64_t seed, uint64_t i) { return splitmix64(seed ^ i); }
static uint64_t fnv1a(const volatile uint8_t *p, size_t n)
{
	uint64_t h = 0xcbf29ce484222325ULL;
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

struct stream { uint8_t buf[4096]; size_t len; };
static void put(struct stream *s, const void *p, size_t n) { memcpy(s->buf + s->len, p, n); s->len += n; }
static void put32(struct stream *s, uint32_t v) { put(s, &v, 4); }
static void put64(struct stream *s, uint64_t v) { put(s, &v, 8); }
static void op_head(struct stream *s, uint32_t op, uint32_t res, uint64_t off, uint64_t len)
{
	put32(s, op); put32(s, res); put64(s, off); put64(s, len);
}

/* ---- result ---- */
static struct {
	const char *device;
	uint64_t p3d, pblob, phv, pctx, pmask;
	int capset_found;
	uint32_t capset_ops;
	uint32_t ctx_capset;
	int ctx_capset_errno;
	unsigned blobs, host_fill_checked, host_write_checked, guest_checked, host_read_checked;
	unsigned host_read_unchecked, mismatches, errors;
	char first_error[160];
	double seconds;
} R = { .device = "absent" };

static void fail(const char *what, int err)
{
	R.errors++;
	if (!R.first_error[0])
		snprintf(R.first_error, sizeof R.first_error, "%s: %s", what, strerror(err));
	printf("GPUTEST error: %s: %s\n", what, strerror(err));
	fflush(stdout);
}

static void result(void)
{
	printf("GPUTEST-RESULT {\"device\":\"%s\",\"param_3d\":%" PRIu64 ",\"param_blob\":%" PRIu64
	       ",\"param_host_visible\":%" PRIu64 ",\"param_context_init\":%" PRIu64
	       ",\"capset_ids_mask\":%" PRIu64 ",\"capset_found\":%d,\"capset_ops\":%u"
	       ",\"context_capset\":%u,\"context_capset_errno\":%d,\"blobs\":%u"
	       ",\"host_fill_checked\":%u,\"host_write_checked\":%u,\"guest_checked\":%u"
	       ",\"host_read_checked\":%u,\"host_read_unchecked\":%u,\"mismatches\":%u"
	       ",\"errors\":%u,\"first_error\":\"%s\",\"seconds\":%.2f}\n",
	       R.device, R.p3d, R.pblob, R.phv, R.pctx, R.pmask, R.capset_found, R.capset_ops,
	       R.ctx_capset, R.ctx_capset_errno, R.blobs, R.host_fill_checked,
	       R.host_write_checked, R.guest_checked, R.host_read_checked,
	       R.host_read_unchecked, R.mismatches, R.errors, R.first_error, R.seconds);
	fflush(stdout);
}

static uint64_t getparam(int fd, uint64_t p)
{
	uint64_t v = 0;
	struct drm_virtgpu_getparam gp = { .param = p, .value = (uint64_t)(uintptr_t)&v };
	if (ioctl(fd, DRM_IOCTL_VIRTGPU_GETPARAM, &gp))
		return 0;
	return v;
}

/* Submits a stream and waits (poll on the out-fence) until the host has run it. */
static int submit(int fd, struct stream *s)
{
	struct drm_virtgpu_execbuffer eb = {
		.flags = VIRTGPU_EXECBUF_FENCE_FD_OUT,
		.size = (uint32_t)s->len,
		.command = (uint64_t)(uintptr_t)s->buf,
		.fence_fd = -1,
	};
	if (ioctl(fd, DRM_IOCTL_VIRTGPU_EXECBUFFER, &eb)) {
		fail("EXECBUFFER", errno);
		return -1;
	}
	struct pollfd pfd = { .fd = eb.fence_fd, .events = POLLIN };
	int n = poll(&pfd, 1, 20000);
	close(eb.fence_fd);
	if (n != 1) {
		fail("EXECBUFFER fence wait (20 s)", n == 0 ? ETIMEDOUT : errno);
		return -1;
	}
	return 0;
}

struct blob { uint32_t bo, res; size_t size; volatile uint8_t *map; };

/* Step markers for the first blobs: where a stalled device stopped the guest. */
static unsigned trace_left = 10;
static void step(unsigned i, const char *what)
{
	if (trace_left) {
		printf("GPUTEST blob %u: %s\n", i, what);
		fflush(stdout);
	}
}

static void blob_close(int fd, struct blob *b)
{
	if (b->map)
		munmap((void *)b->map, b->size);
	if (b->bo) {
		struct drm_gem_close gc = { .handle = b->bo };
		if (ioctl(fd, DRM_IOCTL_GEM_CLOSE, &gc))
			fail("GEM_CLOSE", errno);
	}
	memset(b, 0, sizeof *b);
}

/* One blob's whole check; returns 0 when it went through (mismatches are counted). */
static int blob_run(int fd, struct blob *b, unsigned i)
{
	b->size = (size_t)(1 + i % 16) * 4096;
	struct drm_virtgpu_resource_create_blob cb = {
		.blob_mem = VIRTGPU_BLOB_MEM_HOST3D,
		.blob_flags = VIRTGPU_BLOB_FLAG_USE_MAPPABLE,
		.size = b->size,
		.blob_id = i + 1,
	};
	step(i, "RESOURCE_CREATE_BLOB");
	if (ioctl(fd, DRM_IOCTL_VIRTGPU_RESOURCE_CREATE_BLOB, &cb)) {
		fail("RESOURCE_CREATE_BLOB", errno);
		return -1;
	}
	b->bo = cb.bo_handle;
	b->res = cb.res_handle;
	struct drm_virtgpu_map m = { .handle = b->bo };
	if (ioctl(fd, DRM_IOCTL_VIRTGPU_MAP, &m)) {
		fail("VIRTGPU_MAP", errno);
		return -1;
	}
	step(i, "mmap");
	void *p = mmap(NULL, b->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)m.offset);
	if (p == MAP_FAILED) {
		fail("mmap (the kernel waits for RESOURCE_MAP_BLOB)", errno);
		return -1;
	}
	b->map = p;
	volatile uint64_t *q = (volatile uint64_t *)p;
	size_t nq = b->size / 8;

	/* 1. host FILL, guest reads. */
	uint64_t seed = 0x5eed0000ULL + i;
	struct stream s = { .len = 0 };
	op_head(&s, OP_FILL, b->res, 0, b->size);
	put64(&s, seed);
	step(i, "FILL");
	if (submit(fd, &s))
		return -1;
	unsigned bad = 0;
	for (size_t k = 0; k < nq; k++)
		bad += q[k] != pattern_qword(seed, k);
	R.host_fill_checked++;

	/* 2. host WRITE of stream bytes at an unaligned offset, guest reads. */
	uint8_t data[64];
	for (unsigned k = 0; k < sizeof data; k++)
		data[k] = (uint8_t)(i * 7 + k * 13 + 1);
	uint64_t woff = (uint64_t)(i * 52 + 3) % (b->size - sizeof data);
	s.len = 0;
	op_head(&s, OP_WRITE, b->res, woff, sizeof data);
	put(&s, data, sizeof data);
	step(i, "WRITE");
	if (submit(fd, &s))
		return -1;
	for (unsigned k = 0; k < sizeof data; k++)
		bad += b->map[woff + k] != data[k];
	R.host_write_checked++;

	/* 3. guest writes, reads back; the host reads (and checks when it can). */
	uint64_t gseed = ~seed;
	for (size_t k = 0; k < nq; k++)
		q[k] = pattern_qword(gseed, k);
	for (size_t k = 0; k < nq; k++)
		bad += q[k] != pattern_qword(gseed, k);
	R.guest_checked++;
	size_t body = b->size - 8; /* the last qword receives STORE_CHECKSUM's result */
	s.len = 0;
	op_head(&s, OP_CHECKSUM, b->res, 0, b->size);
	if (R.capset_ops & (1u << OP_STORE_CHECKSUM)) {
		op_head(&s, OP_STORE_CHECKSUM, b->res, 0, body);
		put64(&s, body);
	}
	step(i, "CHECKSUM");
	if (submit(fd, &s))
		return -1;
	if (R.capset_ops & (1u << OP_STORE_CHECKSUM)) {
		bad += q[body / 8] != fnv1a(b->map, body);
		R.host_read_checked++;
	} else {
		R.host_read_unchecked++;
	}
	if (bad) {
		R.mismatches += bad;
		printf("GPUTEST blob %u (res %u, %zu bytes): %u mismatches\n", i, b->res, b->size, bad);
	}
	return 0;
}

int main(int argc, char **argv)
{
	unsigned nblobs = argc > 1 ? (unsigned)atoi(argv[1]) : 128;
	unsigned live = argc > 2 ? (unsigned)atoi(argv[2]) : 8;
	/* Diagnostic knob: pause after each GEM_CLOSE (lets a backend that serves the
	 * frontend's requests only between commands catch up). 0 = off. */
	unsigned settle_ms = argc > 3 ? (unsigned)atoi(argv[3]) : 0;
	if (live < 1 || live > 64)
		live = 8;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);

	int fd = open("/dev/dri/renderD128", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		printf("GPUTEST no virtio-gpu: /dev/dri/renderD128: %s\n", strerror(errno));
		result();
		return 2;
	}
	R.device = "found";
	R.p3d = getparam(fd, VIRTGPU_PARAM_3D_FEATURES);
	R.pblob = getparam(fd, VIRTGPU_PARAM_RESOURCE_BLOB);
	R.phv = getparam(fd, VIRTGPU_PARAM_HOST_VISIBLE);
	R.pctx = getparam(fd, VIRTGPU_PARAM_CONTEXT_INIT);
	R.pmask = getparam(fd, VIRTGPU_PARAM_SUPPORTED_CAPSET_IDS);
	printf("GPUTEST params: 3d %" PRIu64 " blob %" PRIu64 " host_visible %" PRIu64
	       " context_init %" PRIu64 " capset mask 0x%" PRIx64 "\n",
	       R.p3d, R.pblob, R.phv, R.pctx, R.pmask);
	if (!R.p3d || !R.pblob || !R.phv) {
		R.device = "lacks 3d/blob/host_visible";
		result();
		return 1;
	}

	/* The shm capset: the id whose bytes start "HMSHM". Linux 6.1 drops capsets with ids
	 * above MAX_CAPSET_ID (63) at probe, and its capset mask is built with a 32-bit shift
	 * (`1 << id`), so CONTEXT_INIT accepts only ids below 32: try every id the driver can
	 * hold, then SHM_CAPSET_ID itself. */
	uint8_t caps[SHM_CAPSET_SIZE];
	uint32_t capset = 0;
	for (uint32_t id = 1; id <= 64 && !capset; id++) {
		uint32_t want = id == 64 ? SHM_CAPSET_ID : id;
		memset(caps, 0, sizeof caps);
		struct drm_virtgpu_get_caps gc = { .cap_set_id = want, .cap_set_ver = SHM_CAPSET_VERSION,
						   .addr = (uint64_t)(uintptr_t)caps, .size = sizeof caps };
		if (ioctl(fd, DRM_IOCTL_VIRTGPU_GET_CAPS, &gc) == 0 && memcmp(caps, "HMSHM", 5) == 0)
			capset = want;
	}
	if (capset) {
		R.capset_found = 1;
		memcpy(&R.capset_ops, caps + 12, 4);
	} else {
		capset = SHM_CAPSET_ID;
		fail("GET_CAPS: no capset starting HMSHM", ENOENT);
	}
	printf("GPUTEST capset 0x%x: %s, ops mask 0x%x\n", capset,
	       R.capset_found ? "found" : "missing", R.capset_ops);

	/* CONTEXT_INIT with the test capset; when Linux refuses it (see above), the context
	 * falls back to the default capset (0), which the shm backend also accepts. */
	struct drm_virtgpu_context_set_param cp = { .param = VIRTGPU_CONTEXT_PARAM_CAPSET_ID,
						    .value = capset };
	struct drm_virtgpu_context_init ci = { .num_params = 1, .ctx_set_params = (uint64_t)(uintptr_t)&cp };
	if (ioctl(fd, DRM_IOCTL_VIRTGPU_CONTEXT_INIT, &ci) == 0) {
		R.ctx_capset = capset;
	} else {
		R.ctx_capset_errno = errno;
		printf("GPUTEST CONTEXT_INIT capset 0x%x: %s; using the default capset\n",
		       capset, strerror(errno));
		ci.num_params = 0;
		if (ioctl(fd, DRM_IOCTL_VIRTGPU_CONTEXT_INIT, &ci))
			fail("CONTEXT_INIT (default capset)", errno);
	}

	struct blob *ring = calloc(live, sizeof *ring);
	for (unsigned i = 0; i < nblobs && R.errors == 0; i++) {
		struct blob *b = &ring[i % live];
		if (b->bo)
			step(i, "GEM_CLOSE of the oldest live blob");
		int had = b->bo != 0;
		blob_close(fd, b); /* the oldest live blob goes: unmap + unref */
		if (had && settle_ms)
			usleep(settle_ms * 1000);
		if (blob_run(fd, b, i) == 0)
			R.blobs++;
		if (trace_left)
			trace_left--;
		if ((i + 1) % 32 == 0) {
			printf("GPUTEST %u blobs, %u mismatches\n", i + 1, R.mismatches);
			fflush(stdout);
		}
	}
	for (unsigned k = 0; k < live; k++) {
		int had = ring[k].bo != 0;
		blob_close(fd, &ring[k]);
		if (had && settle_ms)
			usleep(settle_ms * 1000);
	}
	close(fd);
	R.device = "ok";
	clock_gettime(CLOCK_MONOTONIC, &t1);
	R.seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	result();
	return (R.blobs == nblobs && R.mismatches == 0 && R.errors == 0) ? 0 : 1;
}
