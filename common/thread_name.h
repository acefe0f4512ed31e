// Names the calling thread as `top -H`, `ps -L`, gdb and /proc/PID/task/TID/comm show it.
//
//   std::thread writer([this] { NameThisThread("nvf-write"); Run(); });
//
// Linux keeps 15 characters; longer names are cut there. Elsewhere it does nothing.
#ifndef NVFP4CAL_COMMON_THREAD_NAME_H_
#define NVFP4CAL_COMMON_THREAD_NAME_H_

#include <cstring>
#include <string>

#if defined(__linux__)
#include <pthread.h>
#endif

namespace nvfp4cal {

inline void NameThisThread(const char* name) {
#if defined(__linux__)
  char cut[16];
  std::strncpy(cut, name, sizeof(cut) - 1);
  cut[sizeof(cut) - 1] = '\0';
  pthread_setname_np(pthread_self(), cut);
#else
  (void)name;
#endif
}

}  // namespace nvfp4cal

#endif  // NVFP4CAL_COMMON_THREAD_NAME_H_
