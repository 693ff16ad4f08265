/*
 * nbdd ublk shim: what JavaScript cannot do for a ublk server (docs/kernel.md, "ublk").
 *
 *   - ctrl(): one control command on /dev/ublk-control. The driver wants an io_uring set up with
 *     IORING_SETUP_SQE128, and commands may block for a long time (START_DEV waits for every
 *     queue's FETCH commands and then scans partitions, which reads the new disk), so each command
 *     runs on a libuv pool thread (napi_async_work): open, ring, submit, wait, close. The event
 *     loop stays free to serve the I/O a command causes. Encoding of the command (opcode numbers,
 *     the 32-byte header's fields and the payload buffer) is JavaScript's (src/ublk/control.ts).
 *   - loopQueueStart() (the default): a hardware queue whose io_uring the event-loop thread owns,
 *     polled by libuv; no thread of its own (below, "queues served on the event-loop thread").
 *   - queueStart() (`attach --queue-threads`): one pthread per hardware queue that owns its
 *     io_uring for the queue's whole life (≤ 6.15 the kernel accepts a queue's FETCH/COMMIT
 *     commands only from one task). The thread mmaps the queue's I/O descriptors, issues FETCH_REQ for every tag and then loops:
 *     one blocking io_uring_enter, reap every CQE, hand all new requests to JavaScript as ONE
 *     threadsafe-function call, and turn the completions JavaScript returned (complete(): pairs
 *     of tag and result, pushed under a mutex, then one eventfd write) into COMMIT_AND_FETCH_REQ
 *     commands submitted by the next io_uring_enter. The eventfd is read by the ring itself, so
 *     one blocking enter waits for both the kernel and JavaScript.
 *
 * Nothing here interprets a request: JavaScript reads and writes the data, and chooses results.
 *
 * Safety (buffer ownership):
 *   - ctrl(buffer): the kernel reads and writes `buffer` while the command runs on the pool thread.
 *     A strong napi_ref holds it from the call until the promise settles; JavaScript must not
 *     detach it meanwhile.
 *   - queueStart(buffer): `buffer` holds depth × maxIo bytes, the I/O buffer of tag t at t × maxIo.
 *     The kernel copies WRITE data into a tag's buffer before the request reaches JavaScript and
 *     copies READ data out of it when the COMMIT is processed. So a tag's buffer belongs to
 *     JavaScript from the moment its request is delivered until complete() is called for the tag,
 *     and to the kernel otherwise: JavaScript must not touch it after complete(). A strong
 *     napi_ref holds the buffer until the queue thread has exited and its ring (with every
 *     command that names the buffer) is closed.
 *   - The descriptors are mapped read-only; the thread copies each into the batch it delivers, so
 *     JavaScript never sees the mapping.
 *   - The queue object stays allocated until both JavaScript's handle is collected and the thread
 *     has been joined (a reference count of two), so complete()/stop() on a finished queue are
 *     harmless no-ops.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <linux/io_uring.h>
#include <node_api.h>
#include <stdbool.h>
#include <uv.h>

#include "napi-util.h"

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif
#ifndef IORING_SETUP_COOP_TASKRUN
#define IORING_SETUP_COOP_TASKRUN (1U << 8)
#endif

/* Layouts from include/uapi/linux/ublk_cmd.h (6.12), checked by size. */
struct nbdd_ublk_ctrl_cmd {
  uint32_t dev_id;
  uint16_t queue_id;
  uint16_t len;
  uint64_t addr;
  uint64_t data[1];
  uint16_t dev_path_len;
  uint16_t pad;
  uint32_t reserved;
};
struct nbdd_ublk_io_cmd {
  uint16_t q_id;
  uint16_t tag;
  int32_t result;
  uint64_t addr;
};
struct nbdd_ublk_iod {
  uint32_t op_flags;
  uint32_t nr_sectors;
  uint64_t start_sector;
  uint64_t addr;
};
_Static_assert(sizeof(struct nbdd_ublk_ctrl_cmd) == 32, "ublksrv_ctrl_cmd is 32 bytes");
_Static_assert(sizeof(struct nbdd_ublk_io_cmd) == 16, "ublksrv_io_cmd is 16 bytes");
_Static_assert(sizeof(struct nbdd_ublk_iod) == 24, "ublksrv_io_desc is 24 bytes");

#define UBLK_MAX_QUEUE_DEPTH 4096
#define UBLK_IO_RES_ABORT (-ENODEV)
#define EFD_USER_DATA 0xffffffffull
/* Words per request record delivered to JavaScript: tag, op_flags, nr_sectors, sector lo, hi. */
#define REC_WORDS 5

#define CHECK(call)                                                            \
  do {                                                                         \
    if ((call) != napi_ok) {                                                   \
      napi_throw_error(env, NULL, "nbdd_ublk: " #call " failed");             \
      return NULL;                                                             \
    }                                                                          \
  } while (0)

/* ---- a minimal io_uring for one thread ------------------------------------------------------ */

typedef struct {
  int fd;
  unsigned *sq_head, *sq_tail, *sq_array, sq_mask, sq_entries;
  unsigned *cq_head, *cq_tail, cq_mask;
  struct io_uring_cqe *cqes;
  uint8_t *sqes;
  size_t sqe_size;
  void *sq_map, *cq_map, *sqe_map;
  size_t sq_len, cq_len, sqe_len;
  unsigned queued;
} mini_ring_t;

static int mini_ring_setup(mini_ring_t *r, unsigned entries, unsigned flags) {
  struct io_uring_params p;
  memset(r, 0, sizeof *r);
  memset(&p, 0, sizeof p);
  p.flags = flags;
  r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
  if (r->fd < 0 && errno == EINVAL && (flags & IORING_SETUP_COOP_TASKRUN)) {
    memset(&p, 0, sizeof p);
    p.flags = flags & ~IORING_SETUP_COOP_TASKRUN;
    r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
  }
  if (r->fd < 0) return -errno;
  r->sqe_size = (p.flags & IORING_SETUP_SQE128) ? 128 : 64;
  r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
  int single = !!(p.features & IORING_FEAT_SINGLE_MMAP);
  if (single && r->cq_len > r->sq_len) r->sq_len = r->cq_len;
  r->sq_map = mmap(NULL, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
  if (r->sq_map == MAP_FAILED) goto fail;
  r->cq_map = single ? r->sq_map
                     : mmap(NULL, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
  if (r->cq_map == MAP_FAILED) goto fail;
  r->sqe_len = p.sq_entries * r->sqe_size;
  r->sqe_map = mmap(NULL, r->sqe_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
  if (r->sqe_map == MAP_FAILED) goto fail;
  uint8_t *sq = r->sq_map, *cq = r->cq_map;
  r->sq_head = (unsigned *)(sq + p.sq_off.head);
  r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
  r->sq_mask = *(unsigned *)(sq + p.sq_off.ring_mask);
  r->sq_entries = p.sq_entries;
  r->sq_array = (unsigned *)(sq + p.sq_off.array);
  r->cq_head = (unsigned *)(cq + p.cq_off.head);
  r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
  r->cq_mask = *(unsigned *)(cq + p.cq_off.ring_mask);
  r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
  r->sqes = r->sqe_map;
  return 0;
fail: {
  int err = -errno;
  if (r->sq_map && r->sq_map != MAP_FAILED) munmap(r->sq_map, r->sq_len);
  if (r->cq_map && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_len);
  close(r->fd);
  return err;
}
}

static void mini_ring_close(mini_ring_t *r) {
  if (r->sqe_map && r->sqe_map != MAP_FAILED) munmap(r->sqe_map, r->sqe_len);
  if (r->cq_map && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_len);
  if (r->sq_map && r->sq_map != MAP_FAILED) munmap(r->sq_map, r->sq_len);
  if (r->fd >= 0) close(r->fd);
  r->fd = -1;
}

/* A zeroed SQE at the tail, published with the next mini_ring_enter; NULL when the SQ is full. */
static struct io_uring_sqe *mini_ring_sqe(mini_ring_t *r) {
  unsigned tail = *r->sq_tail + r->queued;
  unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
  if (tail - head >= r->sq_entries) return NULL;
  unsigned idx = tail & r->sq_mask;
  struct io_uring_sqe *sqe = (struct io_uring_sqe *)(r->sqes + idx * r->sqe_size);
  memset(sqe, 0, r->sqe_size);
  r->sq_array[idx] = idx;
  r->queued++;
  return sqe;
}

/*
 * Publishes what is queued, submits every SQE the kernel has not consumed yet (also ones an
 * earlier call left), and waits for at least `wait` completions; EINTR is retried. Without a
 * wait, EAGAIN/EBUSY (a transient shortage) return -EAGAIN and the SQEs stay for the next call;
 * with one, the call waits for completions (which free what was short) and submits again.
 */
static int mini_ring_enter(mini_ring_t *r, unsigned wait) {
  unsigned tail = *r->sq_tail + r->queued;
  __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
  r->queued = 0;
  for (;;) {
    unsigned n = tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (n == 0 && wait == 0) return 0;
    int rc = (int)syscall(__NR_io_uring_enter, r->fd, n, wait, wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
    if (rc < 0 && errno == EINTR) continue; /* what was submitted is off the SQ: n is recomputed */
    if (rc < 0 && errno != EAGAIN && errno != EBUSY) return -errno;
    if (rc >= 0 && (unsigned)rc >= n) return 0;
    if (rc > 0) continue; /* partly consumed: submit the rest */
    /* EAGAIN/EBUSY, or nothing consumed: a shortage that completions end. */
    if (!wait) return -EAGAIN;
    while ((rc = (int)syscall(__NR_io_uring_enter, r->fd, 0, wait, IORING_ENTER_GETEVENTS, NULL, 0)) < 0 && errno == EINTR) {
    }
    if (rc < 0 && errno != EAGAIN && errno != EBUSY) return -errno;
  }
}

static void uring_cmd_sqe(struct io_uring_sqe *sqe, int fd, uint32_t cmd_op, uint64_t user_data) {
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = fd;
  /* cmd_op overlays `off` at offset 8 (with a zero pad after it). */
  memcpy((uint8_t *)sqe + 8, &cmd_op, sizeof cmd_op);
  sqe->user_data = user_data;
}

static void *sqe_cmd(struct io_uring_sqe *sqe) { return (uint8_t *)sqe + 48; }

/* ---- control commands ---------------------------------------------------------------------- */

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref buf_ref;
  uint32_t cmd_op;
  struct nbdd_ublk_ctrl_cmd cmd;
  int result;   /* cqe->res */
  int sys_err;  /* errno of a failed open/setup/enter, 0 if the command ran */
  const char *stage;
} ctrl_job_t;

static void ctrl_execute(napi_env env, void *data) {
  (void)env;
  ctrl_job_t *j = data;
  int fd = open("/dev/ublk-control", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    j->sys_err = errno;
    j->stage = "open /dev/ublk-control";
    return;
  }
  mini_ring_t r;
  int err = mini_ring_setup(&r, 4, IORING_SETUP_SQE128);
  if (err) {
    close(fd);
    j->sys_err = -err;
    j->stage = "io_uring_setup(SQE128)";
    return;
  }
  struct io_uring_sqe *sqe = mini_ring_sqe(&r);
  uring_cmd_sqe(sqe, fd, j->cmd_op, 1);
  memcpy(sqe_cmd(sqe), &j->cmd, sizeof j->cmd);
  err = mini_ring_enter(&r, 1);
  if (err) {
    j->sys_err = -err;
    j->stage = "io_uring_enter";
  } else {
    unsigned head = *r.cq_head;
    j->result = r.cqes[head & r.cq_mask].res;
    __atomic_store_n(r.cq_head, head + 1, __ATOMIC_RELEASE);
  }
  mini_ring_close(&r);
  close(fd);
}

static void ctrl_complete(napi_env env, napi_status status, void *data) {
  ctrl_job_t *j = data;
  napi_value v;
  if (status != napi_ok) {
    napi_value m;
    napi_create_string_utf8(env, "nbdd_ublk: control command cancelled", NAPI_AUTO_LENGTH, &m);
    napi_create_error(env, NULL, m, &v);
    napi_reject_deferred(env, j->deferred, v);
  } else if (j->sys_err) {
    char msg[160];
    snprintf(msg, sizeof msg, "%s: %s", j->stage, strerror(j->sys_err));
    napi_value m, n;
    napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &m);
    napi_create_error(env, NULL, m, &v);
    napi_create_int32(env, j->sys_err, &n);
    napi_set_named_property(env, v, "errno", n);
    napi_reject_deferred(env, j->deferred, v);
  } else {
    napi_create_int32(env, j->result, &v);
    napi_resolve_deferred(env, j->deferred, v);
  }
  if (j->buf_ref) napi_delete_reference(env, j->buf_ref);
  napi_delete_async_work(env, j->work);
  free(j);
}

/*
 * ctrl(cmdOp, devId, queueId, buffer|null, data0, devPathLen) -> Promise<cqe.res>
 * `buffer` becomes the header's addr/len. Rejects (Error with errno) only when the command could
 * not be issued at all: ENOENT from open means ublk_drv is not loaded.
 */
static napi_value js_ctrl(napi_env env, napi_callback_info info) {
  size_t argc = 6;
  napi_value argv[6];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 6) {
    napi_throw_type_error(env, NULL, "nbdd_ublk.ctrl: 6 arguments");
    return NULL;
  }
  ctrl_job_t *j = calloc(1, sizeof *j);
  if (!j) {
    napi_throw_error(env, NULL, "nbdd_ublk.ctrl: out of memory");
    return NULL;
  }
  uint32_t queue_id, path_len;
  double data0;
  CHECK(napi_get_value_uint32(env, argv[0], &j->cmd_op));
  CHECK(napi_get_value_uint32(env, argv[1], &j->cmd.dev_id));
  CHECK(napi_get_value_uint32(env, argv[2], &queue_id));
  CHECK(napi_get_value_double(env, argv[4], &data0));
  CHECK(napi_get_value_uint32(env, argv[5], &path_len));
  j->cmd.queue_id = (uint16_t)queue_id;
  j->cmd.data[0] = (uint64_t)data0;
  j->cmd.dev_path_len = (uint16_t)path_len;
  napi_valuetype t;
  CHECK(napi_typeof(env, argv[3], &t));
  if (t != napi_null && t != napi_undefined) {
    void *p;
    size_t len;
    if (napi_get_buffer_info(env, argv[3], &p, &len) != napi_ok || len > 0xffff) {
      free(j);
      napi_throw_type_error(env, NULL, "nbdd_ublk.ctrl: buffer must be a Buffer of at most 65535 bytes");
      return NULL;
    }
    j->cmd.addr = (uint64_t)(uintptr_t)p;
    j->cmd.len = (uint16_t)len;
    CHECK(napi_create_reference(env, argv[3], 1, &j->buf_ref));
  }
  napi_value promise, name;
  CHECK(napi_create_promise(env, &j->deferred, &promise));
  CHECK(napi_create_string_utf8(env, "nbdd:ublk-ctrl", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_async_work(env, NULL, name, ctrl_execute, ctrl_complete, j, &j->work));
  CHECK(napi_queue_async_work(env, j->work));
  return promise;
}

/* ---- what both queue carriers share ------------------------------------------------------- */

enum { TAG_KERNEL = 0, TAG_USER = 1, TAG_DONE = 2 };
enum { MSG_READY = 0, MSG_REQUESTS = 1, MSG_EXITED = 2 };

/* One hardware queue: the arguments both constructors start with. */
typedef struct {
  int32_t fd; /* /dev/ublkcN */
  uint16_t qid;
  uint32_t depth, max_io, fetch_op, commit_op;
  uint8_t *buf; /* depth × max_io bytes: tag t's I/O buffer at t × max_io */
} queue_args_t;

/* (cdevFd, qid, depth, maxIo, buffer, fetchOp, commitOp) from argv[0..6]; false after throwing. */
static bool parse_queue_args(napi_env env, napi_value *argv, queue_args_t *a) {
  uint32_t qid;
  void *buf;
  size_t buf_len;
  if (napi_get_value_int32(env, argv[0], &a->fd) != napi_ok || napi_get_value_uint32(env, argv[1], &qid) != napi_ok ||
      napi_get_value_uint32(env, argv[2], &a->depth) != napi_ok || napi_get_value_uint32(env, argv[3], &a->max_io) != napi_ok ||
      napi_get_value_uint32(env, argv[5], &a->fetch_op) != napi_ok || napi_get_value_uint32(env, argv[6], &a->commit_op) != napi_ok ||
      napi_get_buffer_info(env, argv[4], &buf, &buf_len) != napi_ok || a->depth == 0 || a->depth > UBLK_MAX_QUEUE_DEPTH ||
      a->max_io == 0 || buf_len < (size_t)a->depth * a->max_io || qid > 0xffff) {
    napi_throw_range_error(env, NULL, "nbdd_ublk: a queue needs numbers, 1 <= depth <= 4096 and a Buffer of depth * maxIo bytes");
    return false;
  }
  a->qid = (uint16_t)qid;
  a->buf = buf;
  return true;
}

/* The queue's I/O descriptors, mapped read-only (MAP_FAILED and errno on failure). */
static const struct nbdd_ublk_iod *map_iods(const queue_args_t *a, size_t *len) {
  long page = sysconf(_SC_PAGESIZE);
  *len = ((size_t)a->depth * sizeof(struct nbdd_ublk_iod) + page - 1) / page * page;
  off_t off = (off_t)a->qid * (off_t)(((size_t)UBLK_MAX_QUEUE_DEPTH * sizeof(struct nbdd_ublk_iod) + page - 1) / page * page);
  return mmap(NULL, *len, PROT_READ, MAP_SHARED | MAP_POPULATE, a->fd, off);
}

/* Queues FETCH_REQ (op = fetch_op) or COMMIT_AND_FETCH_REQ (commit_op, with result) for a tag. */
static int queue_io_cmd(mini_ring_t *r, const queue_args_t *a, uint32_t op, uint32_t tag, int32_t result) {
  struct io_uring_sqe *sqe = mini_ring_sqe(r);
  if (!sqe) return -ENOSPC; /* cannot happen: the SQ has a slot per tag, and a tag one command */
  uring_cmd_sqe(sqe, a->fd, op, tag);
  struct nbdd_ublk_io_cmd c = {.q_id = a->qid, .tag = (uint16_t)tag, .result = result, .addr = (uint64_t)(uintptr_t)(a->buf + (size_t)tag * a->max_io)};
  memcpy(sqe_cmd(sqe), &c, sizeof c);
  return 0;
}

/*
 * Reaps every CQE: a new request (res 0) becomes a record of REC_WORDS words in `recs` and its
 * tag is JavaScript's; an aborted command (the device is stopping) ends its tag (counted in
 * *done). The CQE of the eventfd read (thread carrier) sets *woken. Returns the records written.
 */
static uint32_t reap(mini_ring_t *r, const queue_args_t *a, const struct nbdd_ublk_iod *iods, uint8_t *state, uint32_t *recs, uint32_t *done, int *woken) {
  uint32_t nrec = 0;
  unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
  for (; head != tail; head++) {
    const struct io_uring_cqe *cqe = &r->cqes[head & r->cq_mask];
    if (cqe->user_data == EFD_USER_DATA) {
      if (woken) *woken = 1;
      continue;
    }
    uint32_t tag = (uint32_t)cqe->user_data;
    if (tag >= a->depth) continue;
    if (cqe->res == 0) {
      const struct nbdd_ublk_iod *d = &iods[tag];
      uint32_t *rec = &recs[nrec++ * REC_WORDS];
      rec[0] = tag;
      rec[1] = __atomic_load_n(&d->op_flags, __ATOMIC_ACQUIRE);
      rec[2] = d->nr_sectors;
      rec[3] = (uint32_t)d->start_sector;
      rec[4] = (uint32_t)(d->start_sector >> 32);
      state[tag] = TAG_USER;
    } else if (state[tag] != TAG_DONE) {
      /* UBLK_IO_RES_ABORT: the device is stopping; anything else is misuse. Either way the tag
       * has no command in the kernel any more. */
      if (cqe->res != UBLK_IO_RES_ABORT) fprintf(stderr, "nbdd ublk q%u tag %u: command failed: %s\n", a->qid, tag, strerror(-cqe->res));
      state[tag] = TAG_DONE;
      (*done)++;
    }
  }
  __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
  return nrec;
}

/* ---- queue threads ------------------------------------------------------------------------- */

typedef struct {
  int kind;
  int code;   /* READY: 0 or -errno; EXITED: 0 (device stopped), 1 (stop()), or -errno */
  int extra;  /* READY: errno of PR_SET_IO_FLUSHER (0 = set) */
  uint32_t n; /* records */
  uint32_t recs[];
} msg_t;

typedef struct {
  int refs; /* JavaScript's handle + the thread (dropped at join); guarded by mu */
  pthread_mutex_t mu;
  pthread_t thread;
  int thread_started;

  queue_args_t a;
  int efd;
  napi_ref buf_ref;
  napi_threadsafe_function tsfn;

  /* Guarded by mu: completions from JavaScript, as (tag, result) pairs. */
  uint32_t *pending;
  uint32_t npending;
  int quit, exited;
} queue_t;

static void queue_unref(queue_t *q) {
  pthread_mutex_lock(&q->mu);
  int left = --q->refs;
  pthread_mutex_unlock(&q->mu);
  if (left) return;
  pthread_mutex_destroy(&q->mu);
  if (q->efd >= 0) close(q->efd);
  free(q->pending);
  free(q);
}

static void post(queue_t *q, int kind, int code, int extra, const uint32_t *recs, uint32_t n) {
  msg_t *m = malloc(sizeof *m + (size_t)n * REC_WORDS * sizeof(uint32_t));
  if (!m) return; /* the requests stay with the thread, unanswered; see queue_main */
  m->kind = kind;
  m->code = code;
  m->extra = extra;
  m->n = n;
  if (n) memcpy(m->recs, recs, (size_t)n * REC_WORDS * sizeof(uint32_t));
  if (napi_call_threadsafe_function(q->tsfn, m, napi_tsfn_blocking) != napi_ok) free(m);
}

/* The eventfd read that wakes the thread when JavaScript has queued results. */
static void queue_efd_read(mini_ring_t *r, int efd, uint64_t *val) {
  struct io_uring_sqe *sqe = mini_ring_sqe(r);
  sqe->opcode = IORING_OP_READ;
  sqe->fd = efd;
  sqe->addr = (uint64_t)(uintptr_t)val;
  sqe->len = sizeof *val;
  sqe->user_data = EFD_USER_DATA;
}

static void *queue_main(void *arg) {
  queue_t *q = arg;
  const queue_args_t *a = &q->a;
  int flusher_err = prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0 ? 0 : errno;
  size_t iod_len = 0;
  uint8_t *state = calloc(a->depth, 1);
  uint32_t *recs = malloc((size_t)a->depth * REC_WORDS * sizeof(uint32_t));
  uint32_t *taken = malloc((size_t)a->depth * 2 * sizeof(uint32_t));
  mini_ring_t r = {.fd = -1};
  const struct nbdd_ublk_iod *iods = MAP_FAILED;
  int code = 0, err = 0;
  if (!state || !recs || !taken) {
    code = -ENOMEM;
    goto out;
  }
  iods = map_iods(a, &iod_len);
  if (iods == MAP_FAILED) {
    code = -errno;
    goto out;
  }
  err = mini_ring_setup(&r, a->depth + 1, IORING_SETUP_COOP_TASKRUN);
  uint64_t efd_val;
  if (!err) queue_efd_read(&r, q->efd, &efd_val);
  for (uint32_t tag = 0; !err && tag < a->depth; tag++) err = queue_io_cmd(&r, a, a->fetch_op, tag, 0);
  if (!err) err = mini_ring_enter(&r, 0);
  if (err) {
    code = err;
    goto out;
  }
  post(q, MSG_READY, 0, flusher_err, NULL, 0);

  uint32_t done = 0;
  for (;;) {
    err = mini_ring_enter(&r, 1);
    if (err) {
      code = err;
      break;
    }
    int woken = 0;
    uint32_t nrec = reap(&r, a, iods, state, recs, &done, &woken);
    if (nrec) post(q, MSG_REQUESTS, 0, 0, recs, nrec);

    if (woken) {
      pthread_mutex_lock(&q->mu);
      uint32_t n = q->npending;
      int quit = q->quit;
      if (n > a->depth) n = a->depth; /* JavaScript never has more than depth requests */
      memcpy(taken, q->pending, (size_t)n * 2 * sizeof(uint32_t));
      q->npending = 0;
      pthread_mutex_unlock(&q->mu);
      if (quit) {
        code = 1;
        break;
      }
      for (uint32_t i = 0; i < n; i++) {
        uint32_t tag = taken[2 * i];
        if (tag >= a->depth || state[tag] != TAG_USER) continue;
        if (queue_io_cmd(&r, a, a->commit_op, tag, (int32_t)taken[2 * i + 1])) break;
        state[tag] = TAG_KERNEL;
      }
      queue_efd_read(&r, q->efd, &efd_val); /* depth + 1 SQEs: one command per tag plus this read */
    }
    if (done == a->depth) break; /* every tag aborted: the device stopped */
  }
out:
  /* Closing the ring cancels the commands still in it (the kernel's ublk cancel callback). */
  if (r.fd >= 0) mini_ring_close(&r);
  if (iods != MAP_FAILED) munmap((void *)iods, iod_len);
  free(state);
  free(recs);
  free(taken);
  pthread_mutex_lock(&q->mu);
  q->exited = 1;
  pthread_mutex_unlock(&q->mu);
  post(q, MSG_EXITED, code, flusher_err, NULL, 0);
  napi_release_threadsafe_function(q->tsfn, napi_tsfn_release);
  return NULL;
}

/* Runs on the event-loop thread: one JavaScript call per message. */
static void queue_call_js(napi_env env, napi_value cb, void *context, void *data) {
  (void)context;
  msg_t *m = data;
  if (env && cb) {
    napi_value argv[4], undef, ab;
    void *p;
    napi_create_int32(env, m->kind, &argv[0]);
    napi_create_int32(env, m->code, &argv[1]);
    napi_create_int32(env, m->extra, &argv[2]);
    if (m->n && napi_create_arraybuffer(env, (size_t)m->n * REC_WORDS * 4, &p, &ab) == napi_ok) {
      memcpy(p, m->recs, (size_t)m->n * REC_WORDS * 4);
      napi_create_typedarray(env, napi_uint32_array, (size_t)m->n * REC_WORDS, ab, 0, &argv[3]);
    } else {
      napi_get_null(env, &argv[3]);
    }
    napi_get_undefined(env, &undef);
    napi_value result;
    if (napi_call_function(env, undef, cb, 4, argv, &result) == napi_pending_exception) {
      napi_value exc;
      napi_get_and_clear_last_exception(env, &exc);
      napi_fatal_exception(env, exc);
    }
  }
  free(m);
}

/* The thread released the function: join it, release the buffer, drop the thread's reference. */
static void queue_tsfn_finalize(napi_env env, void *data, void *hint) {
  (void)hint;
  queue_t *q = data;
  if (q->thread_started) pthread_join(q->thread, NULL);
  if (q->buf_ref) napi_delete_reference(env, q->buf_ref);
  q->buf_ref = NULL;
  queue_unref(q);
}

static void queue_handle_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  queue_unref(data);
}

/*
 * queueStart(cdevFd, qid, depth, maxIo, buffer, fetchOp, commitOp, onEvent) -> handle
 * onEvent(kind, code, extra, records|null): READY once every FETCH is queued (extra = errno of
 * PR_SET_IO_FLUSHER, 0 when set); REQUESTS with Uint32Array records of 5 words (tag, op_flags,
 * nr_sectors, start sector low, high); EXITED last (code 0 device stopped, 1 stop(), <0 -errno).
 */
static napi_value js_queue_start(napi_env env, napi_callback_info info) {
  size_t argc = 8;
  napi_value argv[8];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 8) {
    napi_throw_type_error(env, NULL, "nbdd_ublk.queueStart: 8 arguments");
    return NULL;
  }
  queue_args_t a;
  if (!parse_queue_args(env, argv, &a)) return NULL;
  queue_t *q = calloc(1, sizeof *q);
  if (!q) {
    napi_throw_error(env, NULL, "nbdd_ublk: out of memory");
    return NULL;
  }
  q->a = a;
  q->pending = malloc((size_t)a.depth * 2 * sizeof(uint32_t));
  q->efd = eventfd(0, EFD_CLOEXEC);
  if (!q->pending || q->efd < 0) {
    if (q->efd >= 0) close(q->efd);
    free(q->pending);
    free(q);
    napi_throw_error(env, NULL, "nbdd_ublk: eventfd or memory");
    return NULL;
  }
  pthread_mutex_init(&q->mu, NULL);
  q->refs = 2;
  CHECK(napi_create_reference(env, argv[4], 1, &q->buf_ref));
  napi_value name, handle;
  CHECK(napi_create_string_utf8(env, "nbdd:ublk-queue", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_threadsafe_function(env, argv[7], NULL, name, 0, 1, q, queue_tsfn_finalize, NULL, queue_call_js, &q->tsfn));
  CHECK(napi_create_external(env, q, queue_handle_finalize, NULL, &handle));
  if (pthread_create(&q->thread, NULL, queue_main, q) != 0) {
    /* The finalizer of the function drops the thread's reference and the buffer. */
    napi_release_threadsafe_function(q->tsfn, napi_tsfn_abort);
    napi_throw_error(env, NULL, "nbdd_ublk: pthread_create failed");
    return NULL;
  }
  q->thread_started = 1;
  return handle;
}

static queue_t *get_queue(napi_env env, napi_value v) {
  void *p;
  if (napi_get_value_external(env, v, &p) != napi_ok) {
    napi_throw_type_error(env, NULL, "nbdd_ublk: expected a queue handle");
    return NULL;
  }
  return p;
}

static void wake(queue_t *q) {
  uint64_t one = 1;
  ssize_t rc;
  do rc = write(q->efd, &one, sizeof one);
  while (rc < 0 && errno == EINTR);
}

/* complete(handle, Uint32Array [tag, result, ...]): results for delivered requests (result as i32). */
static napi_value js_complete(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  queue_t *q = get_queue(env, argv[0]);
  if (!q) return NULL;
  napi_typedarray_type type;
  size_t len, off;
  void *data;
  napi_value ab;
  if (napi_get_typedarray_info(env, argv[1], &type, &len, &data, &ab, &off) != napi_ok || type != napi_uint32_array) {
    napi_throw_type_error(env, NULL, "nbdd_ublk.complete: expected a Uint32Array");
    return NULL;
  }
  uint32_t count = 0;
  if (argc >= 3) CHECK(napi_get_value_uint32(env, argv[2], &count));
  else count = (uint32_t)(len / 2);
  if ((size_t)count * 2 > len) count = (uint32_t)(len / 2);
  const uint32_t *pairs = data;
  pthread_mutex_lock(&q->mu);
  int live = !q->exited;
  if (live) {
    for (uint32_t i = 0; i < count && q->npending < q->a.depth; i++) {
      q->pending[2 * q->npending] = pairs[2 * i];
      q->pending[2 * q->npending + 1] = pairs[2 * i + 1];
      q->npending++;
    }
  }
  pthread_mutex_unlock(&q->mu);
  if (live) wake(q);
  return NULL;
}

/* stop(handle): the thread leaves its loop at the next wakeup and closes its ring. */
static napi_value js_queue_stop(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  queue_t *q = get_queue(env, argv[0]);
  if (!q) return NULL;
  pthread_mutex_lock(&q->mu);
  q->quit = 1;
  int live = !q->exited;
  pthread_mutex_unlock(&q->mu);
  if (live) wake(q);
  return NULL;
}

/* ---- queues served on the event-loop thread ------------------------------------------------- */
/*
 * loopQueueStart(): the same queue without a thread of its own. The event-loop thread owns the
 * queue's io_uring (it issues the FETCHes, so it is the queue's daemon task for the kernel); a
 * uv_poll on the ring's fd wakes it when CQEs arrive, and everything reaped in one wakeup is one
 * call into JavaScript. loopCommit() writes a COMMIT_AND_FETCH SQE into the ring's memory without
 * entering the kernel; a uv_prepare handle submits everything queued in one io_uring_enter just
 * before libuv blocks for I/O, so the results of one event-loop turn are one system call. There is
 * no hop between threads: the kernel's task work for a new request wakes the event loop itself.
 *
 * Safety (buffer ownership) is that of queueStart(), with complete() replaced by loopCommit(): a
 * tag's buffer is JavaScript's from delivery until loopCommit() for the tag, then the kernel's.
 * `records` (depth × 5 u32) is written here only just before onEvent is called and is read by
 * JavaScript only inside that call. Both buffers are held by strong references until the ring is
 * closed (loopStop(), or every command aborted), which cancels every command that names them.
 * Every function here runs on the event-loop thread, so nothing is locked.
 */

typedef struct {
  int refs; /* JavaScript's handle + the open ring (dropped when the handles have closed) */
  napi_env env;
  mini_ring_t r;
  uv_poll_t poll;
  uv_prepare_t prepare;
  int handles_open;
  int closed;

  queue_args_t a;
  uint32_t done;
  uint8_t *state;
  uint32_t *recs;
  const struct nbdd_ublk_iod *iods;
  size_t iod_len;
  napi_ref buf_ref, recs_ref, cb_ref;
  napi_async_context actx;
} lq_t;

static void lq_unref(lq_t *q) {
  if (--q->refs == 0) {
    free(q->state);
    free(q);
  }
}

static void lq_handle_closed(uv_handle_t *h) {
  lq_t *q = h->data;
  if (--q->handles_open == 0) lq_unref(q);
}

/* Closes the ring (the kernel cancels the commands still in it) and stops the handles. */
static void lq_close_ring(lq_t *q) {
  if (q->closed) return;
  q->closed = 1;
  uv_poll_stop(&q->poll);
  uv_prepare_stop(&q->prepare);
  uv_close((uv_handle_t *)&q->poll, lq_handle_closed);
  uv_close((uv_handle_t *)&q->prepare, lq_handle_closed);
  mini_ring_close(&q->r);
  if (q->iods) munmap((void *)q->iods, q->iod_len);
  q->iods = NULL;
}

/* After lq_close_ring: the buffers, the callback and its async context go (no more calls). */
static void lq_release(lq_t *q) {
  if (!q->buf_ref) return;
  napi_delete_reference(q->env, q->buf_ref);
  napi_delete_reference(q->env, q->recs_ref);
  napi_delete_reference(q->env, q->cb_ref);
  napi_async_destroy(q->env, q->actx);
  q->buf_ref = q->recs_ref = q->cb_ref = NULL;
}

/* onEvent(kind, count or code): inside a handle scope, microtasks run when it returns. */
static void lq_call(lq_t *q, int kind, int value) {
  napi_env env = q->env;
  napi_value argv[2], fn;
  napi_create_int32(env, kind, &argv[0]);
  napi_create_int32(env, value, &argv[1]);
  napi_get_reference_value(env, q->cb_ref, &fn);
  nbdd_make_callback(env, q->actx, fn, 2, argv);
}

static void lq_on_poll(uv_poll_t *h, int status, int events) {
  (void)status;
  (void)events;
  lq_t *q = h->data;
  if (q->closed) return;
  q->refs++; /* JavaScript may stop the queue inside the call */
  uint32_t nrec = reap(&q->r, &q->a, q->iods, q->state, q->recs, &q->done, NULL);
  napi_handle_scope scope;
  if (napi_open_handle_scope(q->env, &scope) == napi_ok) {
    if (nrec && !q->closed) lq_call(q, MSG_REQUESTS, (int)nrec);
    if (q->done == q->a.depth && !q->closed) {
      /* Every FETCH ended with ABORT: the device stopped. The ring is closed before JavaScript
       * hears of it (it closes /dev/ublkcN and deletes the device next). */
      lq_close_ring(q);
      lq_call(q, MSG_EXITED, 0);
      lq_release(q);
    }
    napi_close_handle_scope(q->env, scope);
  }
  lq_unref(q);
}

/* Just before libuv blocks: the turn's COMMIT_AND_FETCH SQEs in one io_uring_enter. */
static void lq_on_prepare(uv_prepare_t *h) {
  lq_t *q = h->data;
  if (q->closed) return;
  int err = mini_ring_enter(&q->r, 0);
  if (err && err != -EAGAIN) fprintf(stderr, "nbdd ublk q%u: io_uring_enter: %s\n", q->a.qid, strerror(-err));
}

static void lq_handle_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  (void)hint;
  lq_unref(data);
}

/*
 * loopQueueStart(cdevFd, qid, depth, maxIo, buffer, fetchOp, commitOp, records, onEvent) -> handle
 * Every FETCH is queued when it returns (throws an Error with errno otherwise, leaving nothing
 * open). onEvent(kind, value): REQUESTS with the number of 5-word records now in `records` (tag,
 * op_flags, nr_sectors, start sector low, high); EXITED (value 0) once every command has been
 * aborted (the device stopped) — after loopStop() there is no EXITED.
 */
static napi_value js_loop_queue_start(napi_env env, napi_callback_info info) {
  size_t argc = 9;
  napi_value argv[9];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 9) {
    napi_throw_type_error(env, NULL, "nbdd_ublk.loopQueueStart: 9 arguments");
    return NULL;
  }
  queue_args_t a;
  if (!parse_queue_args(env, argv, &a)) return NULL;
  void *recs;
  size_t recs_len, recs_off;
  napi_typedarray_type recs_type;
  napi_value recs_ab;
  if (napi_get_typedarray_info(env, argv[7], &recs_type, &recs_len, &recs, &recs_ab, &recs_off) != napi_ok ||
      recs_type != napi_uint32_array || recs_len < (size_t)a.depth * REC_WORDS) {
    napi_throw_range_error(env, NULL, "nbdd_ublk.loopQueueStart: records must be a Uint32Array of depth * 5");
    return NULL;
  }
  lq_t *q = calloc(1, sizeof *q);
  uint8_t *state = calloc(a.depth, 1);
  if (!q || !state) {
    free(q);
    free(state);
    return nbdd_throw_errno(env, ENOMEM, "ublk queue");
  }
  q->env = env;
  q->a = a;
  q->state = state;
  q->recs = recs;
  q->r.fd = -1;
  const struct nbdd_ublk_iod *iods = map_iods(&a, &q->iod_len);
  if (iods == MAP_FAILED) {
    int e = errno;
    free(state);
    free(q);
    return nbdd_throw_errno(env, e, "mmap of the ublk I/O descriptors");
  }
  q->iods = iods;
  /* COOP_TASKRUN: a new request's task work does not interrupt JavaScript; it runs at the next
   * system call, or wakes the loop from epoll_wait. */
  int err = mini_ring_setup(&q->r, a.depth, IORING_SETUP_COOP_TASKRUN);
  for (uint32_t tag = 0; !err && tag < a.depth; tag++) err = queue_io_cmd(&q->r, &a, a.fetch_op, tag, 0);
  if (!err) err = mini_ring_enter(&q->r, 0);
  if (err) {
    if (q->r.fd >= 0) mini_ring_close(&q->r);
    munmap((void *)iods, q->iod_len);
    free(state);
    free(q);
    return nbdd_throw_errno(env, -err, "ublk queue ring (FETCH)");
  }

  struct uv_loop_s *loop;
  napi_value name, resource, handle;
  CHECK(napi_get_uv_event_loop(env, &loop));
  CHECK(napi_create_reference(env, argv[4], 1, &q->buf_ref));
  CHECK(napi_create_reference(env, argv[7], 1, &q->recs_ref));
  CHECK(napi_create_reference(env, argv[8], 1, &q->cb_ref));
  CHECK(napi_create_string_utf8(env, "nbdd:ublk-queue", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_object(env, &resource));
  CHECK(napi_async_init(env, resource, name, &q->actx));
  uv_poll_init(loop, &q->poll, q->r.fd);
  uv_prepare_init(loop, &q->prepare);
  q->poll.data = q->prepare.data = q;
  q->handles_open = 2;
  q->refs = 2;
  uv_poll_start(&q->poll, UV_READABLE, lq_on_poll);
  uv_prepare_start(&q->prepare, lq_on_prepare);
  uv_unref((uv_handle_t *)&q->prepare);
  CHECK(napi_create_external(env, q, lq_handle_finalize, NULL, &handle));
  return handle;
}

static lq_t *get_loop_queue(napi_env env, napi_value v) {
  void *p;
  if (napi_get_value_external(env, v, &p) != napi_ok) {
    napi_throw_type_error(env, NULL, "nbdd_ublk: expected a loop queue handle");
    return NULL;
  }
  return p;
}

/*
 * loopCommit(handle, tag, result) -> boolean: queues COMMIT_AND_FETCH for a delivered tag (result
 * as i32: bytes done, 0, or -errno); submitted before the loop next blocks. false when the tag is
 * not JavaScript's (never delivered, already committed) or the queue is closed.
 */
static napi_value js_loop_commit(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3], ret;
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  lq_t *q = get_loop_queue(env, argv[0]);
  if (!q) return NULL;
  uint32_t tag;
  int32_t result;
  CHECK(napi_get_value_uint32(env, argv[1], &tag));
  CHECK(napi_get_value_int32(env, argv[2], &result));
  bool ok = !q->closed && tag < q->a.depth && q->state[tag] == TAG_USER && queue_io_cmd(&q->r, &q->a, q->a.commit_op, tag, result) == 0;
  if (ok) q->state[tag] = TAG_KERNEL;
  CHECK(napi_get_boolean(env, ok, &ret));
  return ret;
}

/* loopStop(handle): closes the ring now (the kernel cancels its commands); no EXITED follows. */
static napi_value js_loop_stop(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  lq_t *q = get_loop_queue(env, argv[0]);
  if (!q) return NULL;
  lq_close_ring(q);
  lq_release(q);
  return NULL;
}

napi_value nbdd_ublk_init(napi_env env, napi_value exports) {
  const struct {
    const char *name;
    napi_callback fn;
  } fns[] = {
    {"ublkCtrl", js_ctrl},
    {"ublkQueueStart", js_queue_start},
    {"ublkComplete", js_complete},
    {"ublkQueueStop", js_queue_stop},
    {"ublkLoopQueueStart", js_loop_queue_start},
    {"ublkLoopCommit", js_loop_commit},
    {"ublkLoopStop", js_loop_stop},
  };
  for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
    napi_value f;
    CHECK(napi_create_function(env, fns[i].name, NAPI_AUTO_LENGTH, fns[i].fn, NULL, &f));
    CHECK(napi_set_named_property(env, exports, fns[i].name, f));
  }
  return exports;
}
