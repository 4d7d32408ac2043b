#include "fastrnn/thread_pool.h"

#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <new>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#define FASTRNN_CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define FASTRNN_CPU_RELAX() __asm__ volatile("yield")
#else
#define FASTRNN_CPU_RELAX() ((void)0)
#endif

namespace fastrnn {
namespace {

// How long an idle worker waits for the next job before it parks: long enough to cover the gap
// between the layer calls of a training step. It spins for the first kWorkerBusySpin, then yields
// between checks, so other work on its core (say, torch's threads running an optimizer step
// between fastrnn's calls) is not kept off the CPU.
constexpr auto kWorkerSpin = std::chrono::microseconds(2000);
constexpr auto kWorkerBusySpin = std::chrono::microseconds(50);
// Barrier waits spin for about kBarrierSpin, then yield between checks: with more threads than
// free cores (two processes of two threads on two cores), a spinning waiter keeps the thread it
// waits for off the CPU. A budget in time, not in pause instructions: a pause takes 34 ns on this
// project's Zen 4, and the 16384 spun before yielding cost 0.56 ms at every step (two processes
// at once, LSTM T100 B1 H128: up to 54 ms a call, against 1.0-1.5 ms with 5 us and 0.44-0.47 ms
// alone; see README, Threads). Alone, old/new of seven layers at B=1 to 16: 0.995-1.039x.
constexpr auto kBarrierSpin = std::chrono::microseconds(5);

thread_local bool inside_region = false;

// Two threads of a region on one CPU pass each step's barrier only by yielding to each other, about
// 10 us a step. The scheduler does that now and then when it wakes a worker while other threads
// (say, torch's) hold the other CPUs, and then leaves it there for tens of calls: in a process
// alternating torch's and fastrnn's layers, an LSTM at T=50, B=8, H=32 took 0.57 ms a call in a
// fifth of the calls, against 0.1-0.27 ms (sched_getcpu at every step: in every slow call, the
// two threads shared a CPU at all 50 steps). So a worker, when it starts a region and whenever a
// wait in it outlasts its spin, looks for another thread of the region on its CPU, and if there
// is one, moves to a CPU of its affinity mask that no thread of the region is on: its mask
// narrowed to that CPU (which migrates it at once), then restored. At the start too, because a
// region without a barrier (a single step, a GEMM) never waits long: with the worker put on the
// calling thread's CPU, LSTMCell steps at H=128 took 47-83 us each over the next 200 calls, until
// the scheduler moved it (8-12 us with this check). The calling thread stays where its program
// put it; with no free CPU (more threads than cores) nothing moves, and a worker moves at most
// once per kCpuMoveInterval.
constexpr auto kCpuMoveInterval = std::chrono::milliseconds(1);
// The CPU each thread of the running region was last seen on, plus 1 (0: not known). One region
// runs at a time, so one table serves them all.
std::atomic<int> region_cpus[ThreadPool::kMaxThreads];
thread_local int region_index = -1;  // this thread's index in the running region; -1 outside
thread_local int region_threads = 0;
std::atomic<long> cpu_move_count{0};

// Notes the CPU this thread runs on in the running region's table, and returns it (< 0: unknown).
int note_cpu() {
  const int cpu = sched_getcpu();
  region_cpus[region_index].store(cpu + 1, std::memory_order_relaxed);
  return cpu;
}

// Marks this thread as thread `index` of a region of `threads`, and notes its CPU (returned).
int enter_region(int index, int threads) {
  region_index = index;
  region_threads = threads;
  return note_cpu();
}

void leave_region() { region_index = -1; }

// A worker of the running region, found on `cpu`: moves if another thread of the region is there.
void move_off_shared_cpu(int cpu) {
  if (cpu < 0 || cpu >= CPU_SETSIZE || region_index <= 0) return;
  cpu_set_t taken;
  CPU_ZERO(&taken);
  bool shared = false;
  for (int i = 0; i < region_threads; ++i) {
    const int other = region_cpus[i].load(std::memory_order_relaxed) - 1;
    if (other < 0 || other >= CPU_SETSIZE) continue;
    CPU_SET(other, &taken);
    shared = shared || (i != region_index && other == cpu);
  }
  if (!shared) return;
  thread_local std::chrono::steady_clock::time_point last_move{};
  const auto now = std::chrono::steady_clock::now();
  if (now - last_move < kCpuMoveInterval) return;
  last_move = now;
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof allowed, &allowed) != 0) return;
  for (int target = 0; target < CPU_SETSIZE; ++target) {
    if (!CPU_ISSET(target, &allowed) || CPU_ISSET(target, &taken)) continue;
    cpu_set_t only;
    CPU_ZERO(&only);
    CPU_SET(target, &only);
    if (sched_setaffinity(0, sizeof only, &only) != 0) return;
    sched_setaffinity(0, sizeof allowed, &allowed);
    region_cpus[region_index].store(target + 1, std::memory_order_relaxed);
    cpu_move_count.fetch_add(1, std::memory_order_relaxed);
    return;
  }
}

// The same from inside a wait: notes where this thread runs now first.
void leave_shared_cpu() {
  if (region_index >= 0) move_off_shared_cpu(note_cpu());
}

// The pauses that last about kBarrierSpin, timed once (when the pool is made): no clock reads
// while waiting, where a VM without a fast clock source would make each a system call. The
// fastest of 8 rounds, so that a thread preempted while timing does not cut the spin short.
unsigned barrier_spin_pauses() {
  static const unsigned pauses = [] {
    constexpr int kRounds = 8, kPausesPerRound = 128;
    double fastest_ns = 1e9;
    for (int round = 0; round < kRounds; ++round) {
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < kPausesPerRound; ++i) FASTRNN_CPU_RELAX();
      const std::chrono::duration<double, std::nano> elapsed =
          std::chrono::steady_clock::now() - start;
      fastest_ns = std::min(fastest_ns, elapsed.count());
    }
    const double pause_ns = std::max(1.0, fastest_ns / kPausesPerRound);
    const double budget_ns = std::chrono::nanoseconds(kBarrierSpin).count();
    return static_cast<unsigned>(std::clamp(budget_ns / pause_ns, 16.0, 1e6));
  }();
  return pauses;
}

// Spins until done() holds, for about kBarrierSpin, then yields between checks (once it stops
// spinning, a worker first leaves a CPU it shares with another thread of the region).
template <class Done>
void wait_until(Done done) {
  const unsigned spin_pauses = barrier_spin_pauses();
  for (unsigned spins = 0; !done();) {
    if (spins < spin_pauses) {
      ++spins;
      FASTRNN_CPU_RELAX();
    } else {
      if (spins == spin_pauses) {
        ++spins;
        leave_shared_cpu();
      }
      std::this_thread::yield();
    }
  }
}

int cgroup_cpu_limit() {
  // cgroup v2: "max 100000" or "<quota> <period>"
  std::ifstream v2("/sys/fs/cgroup/cpu.max");
  std::string quota;
  long period = 0;
  if (v2 >> quota >> period && quota != "max" && period > 0)
    return static_cast<int>(std::max(1L, (std::stol(quota) + period - 1) / period));
  // cgroup v1
  std::ifstream q1("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
      p1("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
  long q = 0, p = 0;
  if (q1 >> q && p1 >> p && q > 0 && p > 0) return static_cast<int>(std::max(1L, (q + p - 1) / p));
  return 0;  // no limit
}

}  // namespace

// The GNU OpenMP entry points a region needs (stable ABI since GCC 4.9).
struct ThreadPool::OpenMP {
  std::string library;
  void (*parallel)(void (*fn)(void*), void* data, unsigned threads, unsigned flags);
  int (*thread_num)();
  int (*num_threads)();
};

void SpinBarrier::wait() {
  const std::uint32_t generation = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
    arrived_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    return;
  }
  wait_until([&] { return generation_.load(std::memory_order_acquire) != generation; });
}

void StepProgress::wait_for_others(const ThreadContext& ctx, long step) const {
  for (int i = 0; i < ctx.count; ++i)
    if (i != ctx.index)
      wait_until([&] {
        return done_[static_cast<std::size_t>(i)].step.load(std::memory_order_acquire) >= step;
      });
}

namespace {
std::atomic<long> steal_count{0};
}  // namespace

// Claims and steals only partition the panels: a relaxed compare-and-swap keeps the parts
// disjoint, and the step's barrier publishes what each thread computed.
bool PanelRanges::take_half(int parity, int thread, bool from_back, long min_left, long& first,
                            long& last) {
  std::atomic<std::uint64_t>& bounds = slot(parity, thread);
  std::uint64_t now = bounds.load(std::memory_order_relaxed);
  for (;;) {
    const long begin = static_cast<long>(now >> 32), end = static_cast<long>(now & 0xffffffffu);
    if (end - begin < min_left) return false;
    const long n = std::max(1L, (end - begin) / 2);
    first = from_back ? end - n : begin;
    last = first + n;
    const std::uint64_t rest = from_back ? pack(begin, end - n) : pack(begin + n, end);
    if (bounds.compare_exchange_weak(now, rest, std::memory_order_relaxed)) return true;
  }
}

bool PanelRanges::steal(int parity, int victim, bool victim_from_back, long& first, long& last) {
  if (!take_half(parity, victim, !victim_from_back, kMinSteal, first, last)) return false;
  steal_count.fetch_add(1, std::memory_order_relaxed);
  return true;
}

long PanelRanges::steals() { return steal_count.load(std::memory_order_relaxed); }

void ThreadContext::split(long n, long grain, long& begin, long& end) const {
  const long units = (n + grain - 1) / grain;
  const long per = units / count, extra = units % count;
  const long first = index * per + std::min<long>(index, extra);
  const long last = first + per + (index < extra ? 1 : 0);
  begin = std::min(n, first * grain);
  end = std::min(n, last * grain);
}

int ThreadPool::default_threads() {
  if (const char* env = std::getenv("FASTRNN_NUM_THREADS"); env && *env) {
    char* rest = nullptr;
    const long n = std::strtol(env, &rest, 10);
    if (*rest != '\0' || n < 1 || n > kMaxThreads)
      throw std::invalid_argument("FASTRNN_NUM_THREADS must be a whole number from 1 to " +
                                  std::to_string(kMaxThreads) + ", got '" + std::string(env) + "'");
    return static_cast<int>(n);
  }
  int cores = static_cast<int>(std::thread::hardware_concurrency());
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) cores = CPU_COUNT(&set);
  if (const int limit = cgroup_cpu_limit(); limit > 0) cores = std::min(cores, limit);
  return std::max(1, cores);
}

ThreadPool& ThreadPool::global() {
  // Never destroyed: workers may still be parked when the interpreter exits.
  static ThreadPool* pool = [] {
    auto* p = new ThreadPool();
    pthread_atfork(nullptr, nullptr, &ThreadPool::after_fork_in_child);
    return p;
  }();
  return *pool;
}

ThreadPool::ThreadPool() { barrier_spin_pauses(); }

long ThreadPool::cpu_moves() { return cpu_move_count.load(std::memory_order_relaxed); }

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::after_fork_in_child() {
  // The child has only the forking thread: forget the parent's workers (they do not exist here)
  // and its lock state; workers start again on the next parallel region.
  ThreadPool& pool = global();
  new (&pool.workers_) std::vector<std::thread>();  // leak the parent's handles
  new (&pool.region_mutex_) std::mutex();
  new (&pool.park_mutex_) std::mutex();
  new (&pool.park_cv_) std::condition_variable();
  pool.parked_.store(0);
  pool.workers_busy_.store(0);
  pool.stopping_.store(false);
  // GNU OpenMP's team does not survive a fork: a region started in the child would hang.
  pool.openmp_.store(nullptr);
  inside_region = false;
}

void ThreadPool::set_threads(int threads) {
  if (threads < 1) throw std::invalid_argument("the number of threads must be >= 1");
  std::lock_guard<std::mutex> lock(region_mutex_);
  threads_.store(threads);
  if (static_cast<int>(workers_.size()) != threads - 1) stop_workers();  // restarted lazily
}

void ThreadPool::use_openmp(const std::string& library) {
  static std::map<std::string, OpenMP> loaded;  // guarded by region_mutex_
  std::lock_guard<std::mutex> lock(region_mutex_);
  if (library.empty()) {
    openmp_.store(nullptr);  // the own workers start again on the next region
    return;
  }
  auto found = loaded.find(library);
  if (found == loaded.end()) {
    // RTLD_NOLOAD: only a runtime the process already uses; never a second copy of one.
    void* handle = dlopen(library.c_str(), RTLD_LAZY | RTLD_LOCAL | RTLD_NOLOAD);
    if (!handle) throw std::runtime_error("the OpenMP runtime '" + library + "' is not loaded");
    OpenMP entry{
        library, reinterpret_cast<decltype(OpenMP::parallel)>(dlsym(handle, "GOMP_parallel")),
        reinterpret_cast<decltype(OpenMP::thread_num)>(dlsym(handle, "omp_get_thread_num")),
        reinterpret_cast<decltype(OpenMP::num_threads)>(dlsym(handle, "omp_get_num_threads"))};
    if (!entry.parallel || !entry.thread_num || !entry.num_threads) {
      dlclose(handle);
      throw std::runtime_error("'" + library +
                               "' exports no GOMP_parallel, omp_get_thread_num and "
                               "omp_get_num_threads");
    }
    found = loaded.emplace(library, entry).first;  // the handle stays open for good
  }
  stop_workers();  // idle from now on
  openmp_.store(&found->second);
}

std::string ThreadPool::openmp_library() const {
  const OpenMP* openmp = openmp_.load();
  return openmp ? openmp->library : std::string();
}

void ThreadPool::run_on_openmp(const OpenMP& openmp, int threads, JobFn fn, void* body) {
  struct Region {
    const OpenMP& openmp;
    int threads;
    JobFn fn;
    void* body;
    SpinBarrier barrier;
  } region{openmp, threads, fn, body, SpinBarrier(threads)};
  openmp.parallel(
      [](void* data) {
        Region& r = *static_cast<Region*>(data);
        const bool outer = inside_region;
        inside_region = true;
        if (r.openmp.num_threads() == r.threads) {
          const int index = r.openmp.thread_num();
          enter_region(index, r.threads);
          r.fn(r.body, ThreadContext{index, r.threads, &r.barrier});
          leave_region();
        } else if (r.openmp.thread_num() == 0) {
          // A smaller team than asked for (a thread limit, or nested inside the runtime's own
          // region): the barrier counts on every thread, so thread 0 runs the region alone.
          SpinBarrier alone(1);
          r.fn(r.body, ThreadContext{0, 1, &alone});
        }
        inside_region = outer;
      },
      &region, static_cast<unsigned>(threads), 0);
}

void ThreadPool::start_workers(int workers) {
  stopping_.store(false);
  // The sequence as it is now: a job published before a new thread first looks is still new to it.
  const std::uint64_t seen = job_sequence_.load();
  for (int i = 1; i <= workers; ++i) workers_.emplace_back(&ThreadPool::worker_loop, this, i, seen);
}

bool ThreadPool::match_workers() {
  if (static_cast<int>(workers_.size()) == threads_.load() - 1) return false;
  stop_workers();
  start_workers(threads_.load() - 1);
  return true;
}

void ThreadPool::stop_workers() {
  if (workers_.empty()) return;
  stopping_.store(true);
  publish_job();
  for (auto& w : workers_) w.join();
  workers_.clear();
  stopping_.store(false);
}

void ThreadPool::publish_job() {
  job_sequence_.fetch_add(1);  // sequentially consistent: ordered before the read of parked_
  if (parked_.load() > 0) {
    {
      std::lock_guard<std::mutex> lock(park_mutex_);
    }  // a parker is checking or waiting
    park_cv_.notify_all();
  }
}

bool ThreadPool::wake() {
  if (openmp_.load()) return true;  // the runtime's team: its own business
  std::unique_lock<std::mutex> lock(region_mutex_, std::try_to_lock);
  if (!lock.owns_lock() || inside_region) return false;  // a call runs alone anyway
  if (match_workers()) return false;                     // just started
  if (parked_.load() == 0) return true;
  {
    std::lock_guard<std::mutex> park_lock(park_mutex_);
    wake_sequence_.fetch_add(1);
  }
  park_cv_.notify_all();
  return false;
}

void ThreadPool::worker_loop(int index, std::uint64_t seen) {
  pthread_setname_np(pthread_self(), "fastrnn-worker");  // as top -H and /proc show it
  inside_region = true;  // a worker never starts a nested parallel region
  while (true) {
    std::uint64_t sequence = job_sequence_.load(std::memory_order_acquire);
    auto idle_since = std::chrono::steady_clock::now();
    bool yielding = false;
    for (unsigned spins = 0; sequence == seen; ++spins) {  // unsigned: wraps, never overflows
      if (yielding)
        std::this_thread::yield();
      else
        FASTRNN_CPU_RELAX();
      if (!yielding && (spins & 255) != 255) {  // the clock is read every 256 spins, every yield
        sequence = job_sequence_.load(std::memory_order_acquire);
        continue;
      }
      const auto idle = std::chrono::steady_clock::now() - idle_since;
      yielding = idle > kWorkerBusySpin;
      if (idle > kWorkerSpin) {
        // Park. parked_ is raised before the check under the mutex, and publish_job reads it
        // after bumping the sequence, so either we see the new job or it sees us and notifies.
        parked_.fetch_add(1);
        {
          std::unique_lock<std::mutex> lock(park_mutex_);
          const std::uint64_t woken = wake_sequence_.load();
          park_cv_.wait(
              lock, [&] { return job_sequence_.load() != seen || wake_sequence_.load() != woken; });
        }
        parked_.fetch_sub(1);
        idle_since = std::chrono::steady_clock::now();  // woken without a job: spin again
        yielding = false;
      }
      sequence = job_sequence_.load(std::memory_order_acquire);
    }
    seen = sequence;
    if (stopping_.load()) return;
    if (index < job_threads_) {
      move_off_shared_cpu(enter_region(index, job_threads_));
      job_fn_(job_body_, ThreadContext{index, job_threads_, job_barrier_});
      leave_region();
    }
    workers_busy_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::run_job(int threads, JobFn fn, void* body) {
  threads = std::min(threads, threads_.load());
  std::unique_lock<std::mutex> lock(region_mutex_, std::defer_lock);
  if (threads <= 1 || inside_region || !lock.try_lock()) {
    SpinBarrier unused(1);
    fn(body, ThreadContext{0, 1, &unused});
    return;
  }
  if (const OpenMP* openmp = openmp_.load()) {
    run_on_openmp(*openmp, threads, fn, body);
    return;
  }
  match_workers();
  SpinBarrier barrier(threads);
  job_fn_ = fn;
  job_body_ = body;
  job_threads_ = threads;
  job_barrier_ = &barrier;
  // Every worker acknowledges every job, so a slow worker can never mistake an old job for new.
  workers_busy_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
  enter_region(0, threads);  // before the job is out: the workers check their CPUs against it
  publish_job();
  inside_region = true;
  fn(body, ThreadContext{0, threads, &barrier});
  leave_region();
  inside_region = false;
  wait_until([&] { return workers_busy_.load(std::memory_order_acquire) == 0; });
}

}  // namespace fastrnn
