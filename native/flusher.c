/*
 * PR_SET_IO_FLUSHER on the threads that do I/O for a device: the calling (event-loop) thread, and
 * every thread of libuv's pool. A block-device daemon must not wait on memory reclaim that waits on
 * its own device's writeback (reclaim → writeback to /dev/nbdX → nbdd allocates → reclaim…);
 * PR_SET_IO_FLUSHER (Linux 5.6, CAP_SYS_RESOURCE) makes a thread's allocations avoid I/O reclaim
 * (PF_MEMALLOC_NOIO) and exempts it from dirty throttling (PF_LOCAL_THROTTLE). Threads created
 * afterwards (more pool threads, io_uring io-wq workers, ublk queue threads) inherit the flags
 * from the thread that creates them.
 *
 * The pool is reached with `n` work items that each set the flag and then wait until all `n` have
 * started, so each lands on a different thread. The wait is bounded (WAIT_MS): should the pool be
 * smaller than `n`, or busy, the items go on after it, and the caller learns from the distinct
 * thread ids how many threads were reached.
 *
 * Safety: nothing is shared with JavaScript but the result array, built on the event-loop thread
 * in the completion callback.
 */
#include <errno.h>
#include <node_api.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define WAIT_MS 1000

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif

struct pool_flusher {
  pthread_mutex_t mu;
  pthread_cond_t cond;
  int started; /* items that have run prctl (under mu) */
  napi_deferred deferred;
  int n;
  int done; /* completed items (event-loop thread only) */
  int *tids;
  int errs[];
};

struct pool_item {
  struct pool_flusher *all;
  int index;
  napi_async_work work;
};

static void item_execute(napi_env env, void *data) {
  (void)env;
  struct pool_item *it = data;
  struct pool_flusher *all = it->all;
  all->errs[it->index] = prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0 ? 0 : errno;
  all->tids[it->index] = (int)syscall(SYS_gettid);
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += WAIT_MS / 1000;
  pthread_mutex_lock(&all->mu);
  if (++all->started == all->n) pthread_cond_broadcast(&all->cond);
  while (all->started < all->n) {
    if (pthread_cond_timedwait(&all->cond, &all->mu, &until) != 0) break;
  }
  pthread_mutex_unlock(&all->mu);
}

static void item_complete(napi_env env, napi_status status, void *data) {
  struct pool_item *it = data;
  struct pool_flusher *all = it->all;
  if (status != napi_ok) all->errs[it->index] = ECANCELED;
  napi_delete_async_work(env, it->work);
  free(it);
  if (++all->done < all->n) return;
  /* { errnos: number[], threads: number } — threads: distinct thread ids reached. */
  napi_value out, arr, threads;
  napi_create_object(env, &out);
  napi_create_array_with_length(env, (size_t)all->n, &arr);
  int distinct = 0;
  for (int i = 0; i < all->n; i++) {
    napi_value v;
    napi_create_int32(env, all->errs[i], &v);
    napi_set_element(env, arr, (uint32_t)i, v);
    int seen = 0;
    for (int j = 0; j < i && !seen; j++) seen = all->tids[j] == all->tids[i];
    distinct += !seen;
  }
  napi_create_int32(env, distinct, &threads);
  napi_set_named_property(env, out, "errnos", arr);
  napi_set_named_property(env, out, "threads", threads);
  napi_resolve_deferred(env, all->deferred, out);
  pthread_mutex_destroy(&all->mu);
  pthread_cond_destroy(&all->cond);
  free(all->tids);
  free(all);
}

/* setIoFlusherPool(n) -> Promise<{ errnos, threads }>: the errno (0 = set) of each of n items, and how many distinct pool threads ran them. */
static napi_value js_set_io_flusher_pool(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t n = 0;
  napi_value promise;
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc < 1 || napi_get_value_int32(env, argv[0], &n) != napi_ok || n < 1 || n > 1024) {
    napi_throw_range_error(env, NULL, "setIoFlusherPool(n): n must be 1..1024");
    return NULL;
  }
  struct pool_flusher *all = calloc(1, sizeof *all + (size_t)n * sizeof(int));
  int *tids = calloc((size_t)n, sizeof(int));
  if (!all || !tids) {
    free(all);
    free(tids);
    napi_throw_error(env, NULL, "out of memory");
    return NULL;
  }
  all->n = n;
  all->tids = tids;
  pthread_mutex_init(&all->mu, NULL);
  pthread_cond_init(&all->cond, NULL);
  napi_create_promise(env, &all->deferred, &promise);
  napi_value name;
  napi_create_string_utf8(env, "nbdd:io-flusher", NAPI_AUTO_LENGTH, &name);
  for (int i = 0; i < n; i++) {
    struct pool_item *it = calloc(1, sizeof *it);
    it->all = all;
    it->index = i;
    napi_create_async_work(env, NULL, name, item_execute, item_complete, it, &it->work);
    napi_queue_async_work(env, it->work);
  }
  return promise;
}

/* setIoFlusher() -> 0 or errno: PR_SET_IO_FLUSHER for the calling (event-loop) thread. */
static napi_value js_set_io_flusher(napi_env env, napi_callback_info info) {
  (void)info;
  napi_value out;
  napi_create_int32(env, prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0 ? 0 : errno, &out);
  return out;
}

napi_value nbdd_flusher_init(napi_env env, napi_value exports) {
  napi_value f;
  napi_create_function(env, "setIoFlusherPool", NAPI_AUTO_LENGTH, js_set_io_flusher_pool, NULL, &f);
  napi_set_named_property(env, exports, "setIoFlusherPool", f);
  napi_create_function(env, "setIoFlusher", NAPI_AUTO_LENGTH, js_set_io_flusher, NULL, &f);
  napi_set_named_property(env, exports, "setIoFlusher", f);
  return exports;
}
