/*
 * nbdd_uring: a thin io_uring file-I/O shim for Node (plain N-API, no liburing).
 *
 * What it does, and nothing more (design.md, "Native code thin"):
 *   - sets up one ring (raw io_uring_setup, rings mmapped here), probes the opcodes nbdd needs;
 *   - queues READ / WRITE / WRITEV / FSYNC / FALLOCATE (and, where the kernel has them, SPLICE between
 *     a file and a pipe, POLL_ADD for a socket's bytes or room, and ASYNC_CANCEL of such a poll)
 *     into the submission queue without entering the kernel; a uv_prepare handle submits everything queued in one io_uring_enter per
 *     event-loop iteration (just before libuv blocks for I/O), `submit()` does it on demand;
 *   - an eventfd registered with IORING_REGISTER_EVENTFD is watched by a uv_poll handle, so
 *     completions are drained on the event-loop thread and handed to JavaScript in ONE call per
 *     drain: `onComplete(Int32Array [slot0, res0, slot1, res1, ...])`.
 * Retrying short transfers, EAGAIN/EINTR results and errno mapping are left to JavaScript
 * (src/io/uring-engine.ts).
 *
 * Slots: every queued operation takes a slot (0 .. cq_entries-1), returned to JavaScript and echoed
 * in its completion. There are never more slots in use than CQ entries, so the CQ cannot overflow.
 * When no slot (or, after a submit, no SQE) is free, the queue call returns -1 and JavaScript keeps
 * the operation until completions free a slot. A slot is free again before `onComplete` is called,
 * so JavaScript must read every pair of a batch before it queues anything from that callback.
 *
 * Safety (buffer lifetimes): the kernel reads or writes a Buffer's memory at some later time, from
 * another context. Each queued operation therefore holds a napi_ref (strong, count 1) on every
 * Buffer it uses, from queueing until its CQE has been reaped; only then is the reference deleted
 * and the buffer may be collected. Getting a typed array's data pointer through N-API moves a
 * small on-heap V8 typed array off the heap first, and off-heap backing stores never move, so the
 * pointer stays valid for as long as the reference holds. WRITEV iovec arrays are owned by the slot
 * and freed with it. JavaScript may not detach (transfer) a buffer that is in flight.
 *
 * Teardown: `close()` submits what is queued and waits (blocking) for every operation in flight,
 * delivering their completions (JavaScript may queue more from those callbacks; they are waited
 * for too), then stops both libuv handles, closes the ring and the eventfd and
 * frees the ring once libuv has closed the handles. No cancel is needed: regular-file I/O always
 * completes; only a poll can wait forever (a socket whose peer never reads), so every poll in flight is
 * cancelled first. At environment exit (process or worker) an async cleanup hook does the same without
 * calling JavaScript. While no operation is queued or in flight both handles are unreferenced, so
 * an idle ring never keeps the process alive.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <linux/io_uring.h>
#include <node_api.h>
#include <uv.h>

#include "napi-util.h"

/* The ABI this file relies on, checked against the UAPI header it is compiled with. */
_Static_assert(sizeof(struct io_uring_sqe) == 64, "io_uring_sqe is 64 bytes");
_Static_assert(sizeof(struct io_uring_cqe) == 16, "io_uring_cqe is 16 bytes (no CQE32)");
_Static_assert(offsetof(struct io_uring_sqe, user_data) == 32, "sqe.user_data at 32");
_Static_assert(offsetof(struct io_uring_cqe, res) == 8, "cqe.res at 8");

/* Largest single read/write the kernel transfers (MAX_RW_COUNT = INT_MAX & PAGE_MASK, 4 KiB pages). */
#define URING_MAX_RW 0x7ffff000u

typedef struct {
  napi_ref ref;        /* the one Buffer of READ / WRITE, or NULL */
  napi_ref *refs;      /* WRITEV: one per buffer (malloc'd with iov) */
  struct iovec *iov;   /* WRITEV only */
  unsigned nrefs;
  int poll;            /* a POLL_ADD: cancelled at teardown (it need never complete by itself) */
} slot_t;

/* user_data of the cancels teardown queues: no slot, never delivered. */
#define TEARDOWN_CANCEL UINT64_MAX
/*
 * A poll's user_data is its slot with this bit set, and a cancel names that: a cancel that arrives
 * after its poll completed and the slot went to another operation can then only hit another poll
 * (whose waiter just tries its write again), never a read or a write.
 */
#define POLL_TAG (1ull << 32)

typedef struct {
  napi_env env;
  int ring_fd;
  int event_fd;
  int closed;
  int handles_open;

  /* Submission queue: pointers into the SQ ring mapping. */
  unsigned *sq_head, *sq_tail, *sq_array;
  unsigned sq_mask, sq_entries;
  unsigned sq_tail_local; /* our tail; published to *sq_tail after each SQE */
  unsigned to_submit;     /* queued since the last io_uring_enter */
  struct io_uring_sqe *sqes;

  /* Completion queue. */
  unsigned *cq_head, *cq_tail;
  unsigned cq_mask;
  struct io_uring_cqe *cqes;

  void *sq_map, *cq_map, *sqe_map;
  size_t sq_map_len, cq_map_len, sqe_map_len;

  slot_t *slots;
  unsigned *free_slots; /* stack of free slot numbers */
  unsigned nfree, nslots;

  uv_poll_t poll;
  uv_prepare_t prepare;
  napi_ref on_complete;
  napi_async_context async_ctx;
  napi_async_cleanup_hook_handle cleanup;
  int can_splice; /* SPLICE, POLL_ADD and ASYNC_CANCEL are all supported */
} ring_t;

static int sys_setup(unsigned entries, struct io_uring_params *p) {
  return (int)syscall(__NR_io_uring_setup, entries, p);
}
static int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}
static int sys_register(int fd, unsigned op, void *arg, unsigned nr) {
  return (int)syscall(__NR_io_uring_register, fd, op, arg, nr);
}

#define CHECK(call)                                                            \
  do {                                                                         \
    if ((call) != napi_ok) {                                                   \
      napi_throw_error(env, NULL, "nbdd_uring: " #call " failed");            \
      return NULL;                                                             \
    }                                                                          \
  } while (0)

/* ---- ring mechanics ----------------------------------------------------------------------- */

/* One io_uring_enter for everything queued. Returns 0, or -errno (EAGAIN/EBUSY: try again later). */
static int ring_submit(ring_t *r) {
  while (r->to_submit > 0) {
    int n = sys_enter(r->ring_fd, r->to_submit, 0, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) break;
    r->to_submit -= (unsigned)n;
  }
  return 0;
}

/* The poll handle keeps the loop alive exactly while some slot is in use; prepare never does. */
static void handles_ref(ring_t *r) { uv_ref((uv_handle_t *)&r->poll); }
static void handles_unref(ring_t *r) { uv_unref((uv_handle_t *)&r->poll); }

/* Takes a slot and an SQE (submitting once when the SQ is full). NULL when either is exhausted. */
static struct io_uring_sqe *take_sqe(ring_t *r, unsigned *slot) {
  if (r->closed || r->nfree == 0) return NULL;
  unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
  if (r->sq_tail_local - head >= r->sq_entries) {
    ring_submit(r);
    head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (r->sq_tail_local - head >= r->sq_entries) return NULL;
  }
  if (r->nfree == r->nslots) handles_ref(r);
  *slot = r->free_slots[--r->nfree];
  unsigned idx = r->sq_tail_local & r->sq_mask;
  struct io_uring_sqe *sqe = &r->sqes[idx];
  memset(sqe, 0, sizeof *sqe);
  sqe->user_data = *slot;
  r->sq_array[idx] = idx;
  return sqe;
}

/* Makes the SQE taken last visible to the kernel (it is read at the next io_uring_enter). */
static void publish_sqe(ring_t *r) {
  r->sq_tail_local++;
  __atomic_store_n(r->sq_tail, r->sq_tail_local, __ATOMIC_RELEASE);
  r->to_submit++;
}

static void release_slot(ring_t *r, unsigned slot) {
  slot_t *s = &r->slots[slot];
  if (s->ref) napi_delete_reference(r->env, s->ref);
  for (unsigned i = 0; i < s->nrefs; i++) napi_delete_reference(r->env, s->refs[i]);
  free(s->iov); /* refs live in the same allocation */
  memset(s, 0, sizeof *s);
  r->free_slots[r->nfree++] = slot;
  if (r->nfree == r->nslots) handles_unref(r);
}

/*
 * Reaps every CQE present, frees their slots, then (if `deliver`) calls onComplete once with the
 * (slot, res) pairs. Must run inside a handle scope.
 */
static void drain(ring_t *r, int deliver) {
  napi_env env = r->env;
  unsigned head = *r->cq_head;
  unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
  unsigned n = tail - head;
  if (n == 0) return;
  int32_t *pairs = NULL;
  napi_value ab = NULL, arr = NULL;
  if (deliver && napi_create_arraybuffer(env, (size_t)n * 8, (void **)&pairs, &ab) != napi_ok) deliver = 0;
  unsigned k = 0; /* pairs delivered */
  for (unsigned i = 0; i < n; i++) {
    struct io_uring_cqe *cqe = &r->cqes[(head + i) & r->cq_mask];
    if (cqe->user_data == TEARDOWN_CANCEL) continue;
    unsigned slot = (unsigned)cqe->user_data;
    if (pairs) {
      pairs[2 * k] = (int32_t)slot;
      pairs[2 * k + 1] = cqe->res;
    }
    k++;
    release_slot(r, slot);
  }
  __atomic_store_n(r->cq_head, tail, __ATOMIC_RELEASE);
  if (!deliver || k == 0) return;
  napi_value fn;
  napi_create_typedarray(env, napi_int32_array, (size_t)k * 2, ab, 0, &arr);
  napi_get_reference_value(env, r->on_complete, &fn);
  nbdd_make_callback(env, r->async_ctx, fn, 1, &arr);
}

static void on_poll(uv_poll_t *h, int status, int events) {
  (void)status;
  (void)events;
  ring_t *r = h->data;
  uint64_t count;
  /* Clear the eventfd before draining: a CQE posted after this read signals it again. */
  while (read(r->event_fd, &count, sizeof count) < 0 && errno == EINTR) {
  }
  napi_handle_scope scope;
  if (napi_open_handle_scope(r->env, &scope) != napi_ok) return;
  drain(r, 1);
  napi_close_handle_scope(r->env, scope);
}

static void on_prepare(uv_prepare_t *h) {
  ring_t *r = h->data;
  if (r->to_submit > 0) ring_submit(r);
}

static void on_handle_closed(uv_handle_t *h) {
  ring_t *r = h->data;
  if (--r->handles_open > 0) return;
  napi_remove_async_cleanup_hook(r->cleanup);
  free(r->slots);
  free(r->free_slots);
  free(r);
}

/*
 * Queues an ASYNC_CANCEL (no slot, user_data TEARDOWN_CANCEL) for every poll in flight; their own
 * completions (-ECANCELED) then free their slots. Submits as it goes when the SQ is full.
 */
static void cancel_polls(ring_t *r) {
  for (unsigned i = 0; i < r->nslots; i++) {
    if (!r->slots[i].poll) continue;
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (r->sq_tail_local - head >= r->sq_entries) ring_submit(r);
    head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (r->sq_tail_local - head >= r->sq_entries) return; /* the kernel takes none: nothing to do */
    unsigned idx = r->sq_tail_local & r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_ASYNC_CANCEL;
    sqe->fd = -1;
    sqe->addr = i | POLL_TAG;
    sqe->user_data = TEARDOWN_CANCEL;
    r->sq_array[idx] = idx;
    publish_sqe(r);
  }
}

/* Waits for all in-flight operations, then releases everything (the ring struct on handle close). */
static void destroy_ring(ring_t *r, int deliver) {
  if (r->closed) return;
  cancel_polls(r);
  while (r->nfree < r->nslots) {
    int n = sys_enter(r->ring_fd, r->to_submit, 1, IORING_ENTER_GETEVENTS);
    if (n > 0) r->to_submit -= (unsigned)n;
    if (n < 0 && errno != EINTR && errno != EAGAIN && errno != EBUSY) break;
    napi_handle_scope scope;
    napi_open_handle_scope(r->env, &scope);
    drain(r, deliver);
    napi_close_handle_scope(r->env, scope);
  }
  r->closed = 1;
  if (r->on_complete) napi_delete_reference(r->env, r->on_complete);
  if (r->async_ctx) napi_async_destroy(r->env, r->async_ctx);
  uv_poll_stop(&r->poll);
  uv_prepare_stop(&r->prepare);
  uv_close((uv_handle_t *)&r->poll, on_handle_closed);
  uv_close((uv_handle_t *)&r->prepare, on_handle_closed);
  munmap(r->sqe_map, r->sqe_map_len);
  if (r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_map_len);
  munmap(r->sq_map, r->sq_map_len);
  close(r->ring_fd);
  close(r->event_fd);
}

static void on_env_cleanup(napi_async_cleanup_hook_handle handle, void *arg) {
  (void)handle;
  destroy_ring(arg, 0);
}

/* ---- setup -------------------------------------------------------------------------------- */

static const uint8_t REQUIRED_OPS[] = {
  IORING_OP_READ, IORING_OP_WRITE, IORING_OP_WRITEV, IORING_OP_FSYNC, IORING_OP_FALLOCATE,
};

/* What spliced reads and writes need (5.7 and later): all three, or they are not offered. */
static const uint8_t SPLICE_OPS[] = { IORING_OP_SPLICE, IORING_OP_POLL_ADD, IORING_OP_ASYNC_CANCEL };

/* Returns 0 or a positive errno; on success every field of the ring mapping is set. */
static int map_ring(ring_t *r, unsigned entries, unsigned cq_entries) {
  struct io_uring_params p;
  /* Optional flags first (SUBMIT_ALL 5.18, SINGLE_ISSUER 6.0); older kernels say EINVAL. */
  const unsigned optional[] = { IORING_SETUP_SUBMIT_ALL | IORING_SETUP_SINGLE_ISSUER, 0 };
  int fd = -1;
  for (size_t i = 0; i < sizeof optional / sizeof optional[0] && fd < 0; i++) {
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_CQSIZE | optional[i];
    p.cq_entries = cq_entries;
    fd = sys_setup(entries, &p);
    if (fd < 0 && errno != EINVAL) return errno;
  }
  if (fd < 0) return errno;
  r->ring_fd = fd;

  r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
  if (p.features & IORING_FEAT_SINGLE_MMAP) {
    if (r->cq_map_len > r->sq_map_len) r->sq_map_len = r->cq_map_len;
    r->cq_map_len = r->sq_map_len;
  }
  r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
  if (r->sq_map == MAP_FAILED) return errno;
  if (p.features & IORING_FEAT_SINGLE_MMAP) {
    r->cq_map = r->sq_map;
  } else {
    r->cq_map = mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
    if (r->cq_map == MAP_FAILED) return errno;
  }
  r->sqe_map_len = p.sq_entries * sizeof(struct io_uring_sqe);
  r->sqe_map = mmap(NULL, r->sqe_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
  if (r->sqe_map == MAP_FAILED) return errno;

  char *sq = r->sq_map, *cq = r->cq_map;
  r->sq_head = (unsigned *)(sq + p.sq_off.head);
  r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
  r->sq_mask = *(unsigned *)(sq + p.sq_off.ring_mask);
  r->sq_entries = p.sq_entries;
  r->sq_array = (unsigned *)(sq + p.sq_off.array);
  r->sq_tail_local = *r->sq_tail;
  r->sqes = r->sqe_map;
  r->cq_head = (unsigned *)(cq + p.cq_off.head);
  r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
  r->cq_mask = *(unsigned *)(cq + p.cq_off.ring_mask);
  r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
  r->nslots = p.cq_entries;

  struct {
    struct io_uring_probe probe;
    struct io_uring_probe_op ops[256];
  } pr;
  memset(&pr, 0, sizeof pr);
  if (sys_register(fd, IORING_REGISTER_PROBE, &pr, 256) < 0) return errno;
  for (size_t i = 0; i < sizeof REQUIRED_OPS; i++) {
    uint8_t op = REQUIRED_OPS[i];
    if (op > pr.probe.last_op || !(pr.ops[op].flags & IO_URING_OP_SUPPORTED)) return EOPNOTSUPP;
  }
  r->can_splice = 1;
  for (size_t i = 0; i < sizeof SPLICE_OPS; i++) {
    uint8_t op = SPLICE_OPS[i];
    if (op > pr.probe.last_op || !(pr.ops[op].flags & IO_URING_OP_SUPPORTED)) r->can_splice = 0;
  }

  r->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (r->event_fd < 0) return errno;
  if (sys_register(fd, IORING_REGISTER_EVENTFD, &r->event_fd, 1) < 0) return errno;
  return 0;
}

static void unmap_failed(ring_t *r) {
  if (r->sqe_map && r->sqe_map != MAP_FAILED) munmap(r->sqe_map, r->sqe_map_len);
  if (r->cq_map && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_map_len);
  if (r->sq_map && r->sq_map != MAP_FAILED) munmap(r->sq_map, r->sq_map_len);
  if (r->event_fd >= 0) close(r->event_fd);
  if (r->ring_fd >= 0) close(r->ring_fd);
  free(r);
}

/* setup(sqEntries, cqEntries, onComplete) -> ring (external). Throws Error{errno} if unavailable. */
static napi_value js_setup(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  uint32_t entries, cq_entries;
  CHECK(napi_get_value_uint32(env, argv[0], &entries));
  CHECK(napi_get_value_uint32(env, argv[1], &cq_entries));

  ring_t *r = calloc(1, sizeof *r);
  if (!r) return nbdd_throw_errno(env, ENOMEM, "io_uring setup");
  r->env = env;
  r->ring_fd = r->event_fd = -1;
  int err = map_ring(r, entries, cq_entries);
  if (err) {
    unmap_failed(r);
    return nbdd_throw_errno(env, err, "io_uring setup");
  }
  r->slots = calloc(r->nslots, sizeof *r->slots);
  r->free_slots = malloc(r->nslots * sizeof *r->free_slots);
  if (!r->slots || !r->free_slots) {
    free(r->slots);
    free(r->free_slots);
    unmap_failed(r);
    return nbdd_throw_errno(env, ENOMEM, "io_uring setup");
  }
  for (unsigned i = 0; i < r->nslots; i++) r->free_slots[i] = r->nslots - 1 - i;
  r->nfree = r->nslots;

  struct uv_loop_s *loop;
  napi_value name, resource, ext;
  CHECK(napi_get_uv_event_loop(env, &loop));
  CHECK(napi_create_reference(env, argv[2], 1, &r->on_complete));
  CHECK(napi_create_string_utf8(env, "nbdd:io_uring", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_object(env, &resource));
  CHECK(napi_async_init(env, resource, name, &r->async_ctx));
  uv_poll_init(loop, &r->poll, r->event_fd);
  uv_prepare_init(loop, &r->prepare);
  r->poll.data = r->prepare.data = r;
  r->handles_open = 2;
  uv_poll_start(&r->poll, UV_READABLE, on_poll);
  uv_prepare_start(&r->prepare, on_prepare);
  uv_unref((uv_handle_t *)&r->prepare);
  handles_unref(r);
  CHECK(napi_add_async_cleanup_hook(env, on_env_cleanup, r, &r->cleanup));
  CHECK(napi_create_external(env, r, NULL, NULL, &ext));
  return ext;
}

/* ---- queueing ----------------------------------------------------------------------------- */

typedef struct {
  ring_t *r;
  int32_t fd;
  napi_value argv[5];
} call_t;

/* Reads the ring and fd arguments common to every queue call; NULL (with a pending exception). */
static ring_t *get_call(napi_env env, napi_callback_info info, size_t want, call_t *c) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, c->argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, NULL, "nbdd_uring: missing arguments");
    return NULL;
  }
  void *p;
  if (napi_get_value_external(env, c->argv[0], &p) != napi_ok ||
      napi_get_value_int32(env, c->argv[1], &c->fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "nbdd_uring: expected (ring, fd, ...)");
    return NULL;
  }
  c->r = p;
  if (c->r->closed) {
    nbdd_throw_errno(env, EBADF, "io_uring: ring is closed");
    return NULL;
  }
  return c->r;
}

static int get_u8(napi_env env, napi_value v, void **data, size_t *len) {
  napi_typedarray_type type;
  napi_value ab;
  size_t off;
  if (napi_get_typedarray_info(env, v, &type, len, data, &ab, &off) != napi_ok || type != napi_uint8_array) {
    napi_throw_type_error(env, NULL, "nbdd_uring: expected a Buffer");
    return -1;
  }
  if (*len > URING_MAX_RW) {
    napi_throw_range_error(env, NULL, "nbdd_uring: one transfer is at most 0x7ffff000 bytes");
    return -1;
  }
  return 0;
}

static napi_value slot_value(napi_env env, int64_t slot) {
  napi_value v;
  napi_create_int32(env, (int32_t)slot, &v);
  return v;
}

/*
 * `how`, the last argument of read/write/writev: a number, a bitwise OR of
 * - HOW_OFFLOAD: IOSQE_ASYNC. The kernel hands the request straight to its io-wq workers instead
 *   of first trying it inline inside io_uring_enter. For buffered writes the inline attempt usually
 *   succeeds, which means the page-cache copy and filesystem work run on the event-loop thread;
 *   offloading keeps that thread free (docs/io-engine.md has the measurement).
 * - HOW_DSYNC: RWF_DSYNC (writes). The write completes once its bytes are durable, as if an
 *   fdatasync of that range alone followed: the kernel writes back only those pages (ext4, xfs and
 *   btrfs sync the written range, not the file) and flushes the device cache.
 */
#define HOW_OFFLOAD 1u
#define HOW_DSYNC 2u
#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif

static uint32_t get_how(napi_env env, napi_value v) {
  uint32_t how = 0;
  napi_get_value_uint32(env, v, &how);
  return how;
}

static void set_how(struct io_uring_sqe *sqe, uint32_t how) {
  sqe->flags = (how & HOW_OFFLOAD) ? IOSQE_ASYNC : 0;
  sqe->rw_flags = (how & HOW_DSYNC) ? RWF_DSYNC : 0;
}

/* read/write(ring, fd, buf, offset, how) -> slot, or -1 when full. */
static napi_value queue_rw(napi_env env, napi_callback_info info, uint8_t opcode) {
  call_t c;
  if (!get_call(env, info, 5, &c)) return NULL;
  void *data;
  size_t len;
  int64_t offset;
  if (get_u8(env, c.argv[2], &data, &len) < 0) return NULL;
  CHECK(napi_get_value_int64(env, c.argv[3], &offset));
  uint32_t how = get_how(env, c.argv[4]);
  unsigned slot;
  struct io_uring_sqe *sqe = take_sqe(c.r, &slot);
  if (!sqe) return slot_value(env, -1);
  if (napi_create_reference(env, c.argv[2], 1, &c.r->slots[slot].ref) != napi_ok) {
    release_slot(c.r, slot);
    napi_throw_error(env, NULL, "nbdd_uring: napi_create_reference failed");
    return NULL;
  }
  sqe->opcode = opcode;
  set_how(sqe, how);
  sqe->fd = c.fd;
  sqe->addr = (uintptr_t)data;
  sqe->len = (uint32_t)len;
  sqe->off = (uint64_t)offset;
  publish_sqe(c.r);
  return slot_value(env, slot);
}

static napi_value js_read(napi_env env, napi_callback_info info) { return queue_rw(env, info, IORING_OP_READ); }
static napi_value js_write(napi_env env, napi_callback_info info) { return queue_rw(env, info, IORING_OP_WRITE); }

/* writev(ring, fd, buffers[], offset, how) -> slot, or -1 when full. */
static napi_value js_writev(napi_env env, napi_callback_info info) {
  call_t c;
  if (!get_call(env, info, 5, &c)) return NULL;
  uint32_t n;
  int64_t offset;
  CHECK(napi_get_array_length(env, c.argv[2], &n));
  CHECK(napi_get_value_int64(env, c.argv[3], &offset));
  uint32_t how = get_how(env, c.argv[4]);
  if (n == 0 || n > IOV_MAX) return nbdd_throw_errno(env, EINVAL, "io_uring writev: 1..IOV_MAX buffers");
  unsigned slot;
  struct io_uring_sqe *sqe = take_sqe(c.r, &slot);
  if (!sqe) return slot_value(env, -1);
  slot_t *s = &c.r->slots[slot];
  /* One allocation: n iovecs, then n references. Owned by the slot until its CQE. */
  s->iov = malloc(n * (sizeof *s->iov + sizeof *s->refs));
  if (!s->iov) {
    release_slot(c.r, slot);
    return nbdd_throw_errno(env, ENOMEM, "io_uring writev");
  }
  s->refs = (napi_ref *)(s->iov + n);
  for (uint32_t i = 0; i < n; i++) {
    napi_value b;
    if (napi_get_element(env, c.argv[2], i, &b) != napi_ok || get_u8(env, b, &s->iov[i].iov_base, &s->iov[i].iov_len) < 0 ||
        napi_create_reference(env, b, 1, &s->refs[i]) != napi_ok) {
      release_slot(c.r, slot); /* the SQE stays unpublished and is reused by the next take */
      return NULL;
    }
    s->nrefs = i + 1;
  }
  sqe->opcode = IORING_OP_WRITEV;
  set_how(sqe, how);
  sqe->fd = c.fd;
  sqe->addr = (uintptr_t)s->iov;
  sqe->len = n;
  sqe->off = (uint64_t)offset;
  publish_sqe(c.r);
  return slot_value(env, slot);
}

/* fsync(ring, fd, datasync) -> slot, or -1 when full. */
static napi_value js_fsync(napi_env env, napi_callback_info info) {
  call_t c;
  if (!get_call(env, info, 3, &c)) return NULL;
  bool datasync;
  CHECK(napi_get_value_bool(env, c.argv[2], &datasync));
  unsigned slot;
  struct io_uring_sqe *sqe = take_sqe(c.r, &slot);
  if (!sqe) return slot_value(env, -1);
  sqe->opcode = IORING_OP_FSYNC;
  sqe->fd = c.fd;
  sqe->fsync_flags = datasync ? IORING_FSYNC_DATASYNC : 0;
  publish_sqe(c.r);
  return slot_value(env, slot);
}

/* fallocate(ring, fd, mode, offset, length) -> slot, or -1 when full. */
static napi_value js_fallocate(napi_env env, napi_callback_info info) {
  call_t c;
  if (!get_call(env, info, 5, &c)) return NULL;
  int32_t mode;
  int64_t offset, length;
  CHECK(napi_get_value_int32(env, c.argv[2], &mode));
  CHECK(napi_get_value_int64(env, c.argv[3], &offset));
  CHECK(napi_get_value_int64(env, c.argv[4], &length));
  unsigned slot;
  struct io_uring_sqe *sqe = take_sqe(c.r, &slot);
  if (!sqe) return slot_value(env, -1);
  /* IORING_OP_FALLOCATE: mode in len, length in addr (io_uring/sync.c, io_fallocate_prep). */
  sqe->opcode = IORING_OP_FALLOCATE;
  sqe->fd = c.fd;
  sqe->off = (uint64_t)offset;
  sqe->addr = (uint64_t)length;
  sqe->len = (uint32_t)mode;
  publish_sqe(c.r);
  return slot_value(env, slot);
}

/*
 * One SPLICE between a file at an offset and a pipe: the arguments are (ring, fd, offset, otherFd,
 * length), the file and the pipe in the order of the call (see js_splice and js_splice_out).
 * SPLICE_F_MOVE, and SPLICE_F_NONBLOCK so that a pipe without room (or bytes) answers -EAGAIN
 * instead of waiting. Short results happen; the caller goes on or gives up.
 */
static napi_value queue_splice(napi_env env, napi_callback_info info, bool into_pipe) {
  call_t c;
  if (!get_call(env, info, 5, &c)) return NULL;
  int64_t offset;
  int32_t other;
  uint32_t len;
  CHECK(napi_get_value_int64(env, c.argv[2], &offset));
  CHECK(napi_get_value_int32(env, c.argv[3], &other));
  CHECK(napi_get_value_uint32(env, c.argv[4], &len));
  if (!c.r->can_splice) return nbdd_throw_errno(env, EOPNOTSUPP, "io_uring splice");
  unsigned slot;
  struct io_uring_sqe *sqe = take_sqe(c.r, &slot);
  if (!sqe) return slot_value(env, -1);
  /* io_uring/splice.c, io_splice_prep: fd is the output, splice_fd_in the input, off the output
   * offset (-1: none, a pipe), splice_off_in the input offset. */
  sqe->opcode = IORING_OP_SPLICE;
  sqe->fd = into_pipe ? other : c.fd;
  sqe->off = into_pipe ? (uint64_t)-1 : (uint64_t)offset;
  sqe->splice_fd_in = into_pipe ? c.fd : other;
  sqe->splice_off_in = into_pipe ? (uint64_t)offset : (uint64_t)-1;
  sqe->len = len;
  sqe->splice_flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK;
  publish_sqe(c.r);
  return slot_value(env, slot);
}

/*
 * splice(ring, fd, offset, pipeFd, length) -> slot, or -1 when full: moves `length` bytes of the
 * file `fd` at `offset` into the pipe by reference to its page-cache pages.
 */
static napi_value js_splice(napi_env env, napi_callback_info info) { return queue_splice(env, info, true); }

/*
 * spliceOut(ring, fd, offset, pipeFd, length) -> slot, or -1 when full: moves up to `length` bytes
 * from the pipe into the file `fd` at `offset` (the kernel copies them into the page cache; a
 * large WRITE's payload spliced from its socket, see src/nbd/server/spliced-payload.ts).
 */
static napi_value js_splice_out(napi_env env, napi_callback_info info) { return queue_splice(env, info, false); }

/*
 * poll(ring, fd, events) -> slot, or -1 when full: completes with the revents once `fd` is ready
 * for `events` (POLLIN: bytes to read; POLLOUT: room to write), or has an error or hang-up.
 */
static napi_value js_poll(napi_env env, napi_callback_info info) {
  call_t c;
  if (!get_call(env, info, 3, &c)) return NULL;
  uint32_t events;
  CHECK(napi_get_value_uint32(env, c.argv[2], &events));
  if (!c.r->can_splice) return nbdd_throw_errno(env, EOPNOTSUPP, "io_uring poll");
  unsigned slot;
  struct io_uring_sqe *sqe = take_sqe(c.r, &slot);
  if (!sqe) return slot_value(env, -1);
  sqe->opcode = IORING_OP_POLL_ADD;
  sqe->fd = c.fd;
  sqe->poll32_events = events & (POLLIN | POLLOUT); /* POLLERR and POLLHUP are always reported */
  sqe->user_data = slot | POLL_TAG;
  c.r->slots[slot].poll = 1;
  publish_sqe(c.r);
  return slot_value(env, slot);
}

/* cancel(ring, slot) -> slot of the cancel, or -1 when full: the poll in `slot` ends with -ECANCELED. */
static napi_value js_cancel(napi_env env, napi_callback_info info) {
  call_t c; /* the "fd" argument is the slot to cancel */
  if (!get_call(env, info, 2, &c)) return NULL;
  if (!c.r->can_splice) return nbdd_throw_errno(env, EOPNOTSUPP, "io_uring cancel");
  unsigned slot;
  struct io_uring_sqe *sqe = take_sqe(c.r, &slot);
  if (!sqe) return slot_value(env, -1);
  sqe->opcode = IORING_OP_ASYNC_CANCEL;
  sqe->fd = -1;
  sqe->addr = (uint64_t)(uint32_t)c.fd | POLL_TAG;
  publish_sqe(c.r);
  return slot_value(env, slot);
}

/* canSplice(ring) -> whether splice, spliceOut, poll and cancel work here. */
static napi_value js_can_splice(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], out;
  void *p;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  CHECK(napi_get_value_external(env, argv[0], &p));
  CHECK(napi_get_boolean(env, ((ring_t *)p)->can_splice && !((ring_t *)p)->closed, &out));
  return out;
}

/* submit(ring) -> 0 or -errno (EAGAIN/EBUSY: the kernel is short of resources, retried later). */
static napi_value js_submit(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], out;
  void *p;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  CHECK(napi_get_value_external(env, argv[0], &p));
  ring_t *r = p;
  CHECK(napi_create_int32(env, r->closed ? -EBADF : ring_submit(r), &out));
  return out;
}

/* close(ring): waits for everything in flight (completions delivered), then tears down. */
static napi_value js_close(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  void *p;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  CHECK(napi_get_value_external(env, argv[0], &p));
  destroy_ring(p, 1);
  return NULL;
}

/* inFlight(ring) -> slots in use (queued or submitted, not yet completed). */
static napi_value js_in_flight(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1], out;
  void *p;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  CHECK(napi_get_value_external(env, argv[0], &p));
  ring_t *r = p;
  CHECK(napi_create_uint32(env, r->closed ? 0 : r->nslots - r->nfree, &out));
  return out;
}

napi_value nbdd_ublk_init(napi_env env, napi_value exports); /* ublk.c */
napi_value nbdd_flusher_init(napi_env env, napi_value exports); /* flusher.c */

static napi_value init(napi_env env, napi_value exports) {
  const struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
    {"setup", js_setup},   {"read", js_read},         {"write", js_write},   {"writev", js_writev},
    {"fsync", js_fsync},   {"fallocate", js_fallocate}, {"submit", js_submit}, {"close", js_close},
    {"inFlight", js_in_flight}, {"splice", js_splice}, {"spliceOut", js_splice_out}, {"poll", js_poll},
    {"cancel", js_cancel}, {"canSplice", js_can_splice},
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value f;
    CHECK(napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &f));
    CHECK(napi_set_named_property(env, exports, fns[i].name, f));
  }
  nbdd_flusher_init(env, exports);
  return nbdd_ublk_init(env, exports);
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
