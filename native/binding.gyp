{
  "targets": [
    {
      "target_name": "nbdd_uring",
      "sources": ["uring.c", "ublk.c", "flusher.c"],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]
    }
  ]
}
