/*
 * What uring.c and ublk.c both need from N-API: errors with an errno, and calls into JavaScript
 * from a libuv callback. Header-only (static inline): each addon file gets its own copy.
 */
#ifndef NBDD_NAPI_UTIL_H
#define NBDD_NAPI_UTIL_H

#include <stdio.h>
#include <string.h>
#include <node_api.h>

/* Throws an Error whose `errno` property is the positive errno; returns NULL for the caller. */
static inline napi_value nbdd_throw_errno(napi_env env, int err, const char *what) {
  char msg[160];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
  napi_value m, e, n;
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &m);
  napi_create_error(env, NULL, m, &e);
  napi_create_int32(env, err, &n);
  napi_set_named_property(env, e, "errno", n);
  napi_throw(env, e);
  return NULL;
}

/*
 * Calls `fn` from outside JavaScript (a libuv callback; inside a handle scope) so that promise
 * continuations run when it returns. An exception it throws is the process's uncaught exception.
 */
static inline void nbdd_make_callback(napi_env env, napi_async_context ctx, napi_value fn, size_t argc, const napi_value *argv) {
  napi_value recv, result;
  napi_get_global(env, &recv); /* napi_make_callback needs an object receiver */
  if (napi_make_callback(env, ctx, recv, fn, argc, argv, &result) == napi_pending_exception) {
    napi_value exc;
    napi_get_and_clear_last_exception(env, &exc);
    napi_fatal_exception(env, exc);
  }
}

#endif
