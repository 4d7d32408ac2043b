// fastrnn's own persistent thread pool: one parallel region at a time, the calling thread taking
// part as thread 0, and a spin barrier for the per-time-step synchronisation of the drivers.
//
// Waking a parked thread can cost milliseconds on a VM (performance.md), so workers spin for a
// while after each region before they park, and the barrier spins instead of sleeping.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace fastrnn {

// A reusable barrier for the threads of one parallel region.
class SpinBarrier {
 public:
  explicit SpinBarrier(int threads) : threads_(threads) {}
  void wait();

 private:
  const int threads_;
  std::atomic<int> arrived_{0};
  std::atomic<std::uint32_t> generation_{0};
};

// What every thread of a region is told: its index, the thread count, and the region's barrier.
struct ThreadContext {
  int index;
  int count;
  SpinBarrier* barrier;
  void sync() const {
    if (count > 1) barrier->wait();
  }
  // This thread's share [begin, end) of n items cut into `count` contiguous parts, in multiples of
  // `grain` (the last part takes the remainder).
  void split(long n, long grain, long& begin, long& end) const;
};

// Point-to-point ordering for a time loop: each thread of a region announces the steps it has
// finished, and a thread that reads the others' results of a step waits for exactly those
// (cheaper than a barrier: it can work on its own results while the others catch up). Steps are
// counted up from 0 in the order the loop runs them.
class StepProgress {
 public:
  explicit StepProgress(int threads) : done_(static_cast<std::size_t>(threads)) {}
  void finished(const ThreadContext& ctx, long step) {
    done_[static_cast<std::size_t>(ctx.index)].step.store(step, std::memory_order_release);
  }
  void wait_for_others(const ThreadContext& ctx, long step) const;

 private:
  struct alignas(64) Done {  // one cache line each: threads write their own
    std::atomic<long> step{-1};
  };
  std::vector<Done> done_;
};

// Work stealing within a time step. Each thread owns a range of the step's panels and claims half
// of what is left of it at a time (at least one panel), from one end; once its own are done, it
// takes half of another thread's unclaimed panels from the other end. On a shared VM one core
// often runs at two thirds speed for tens of milliseconds (an FMA loop pinned to each CPU, 10 ms
// samples: 55-65 GFLOP/s on one while the other made 85-91), and a step cut in fixed halves then
// runs at the slower core's pace. Ranges are kept per step parity: a thread resets its range for
// the next step during this one, when no thread steals from that range any more (all have passed
// the previous step's barrier). A forward's input GEMM shares its panels the same way, with
// ranges of its own, per chunk of steps.
class PanelRanges {
 public:
  explicit PanelRanges(int threads) : ranges_(2 * static_cast<std::size_t>(threads)) {}
  // Thread `thread`'s panels [first, last) for the steps of `parity`.
  void reset(int parity, int thread, long first, long last) {
    slot(parity, thread).store(pack(first, last), std::memory_order_relaxed);
  }
  // Half of the panels the thread has not claimed yet (at least one), from the back if
  // `from_back`; false when none is left.
  bool claim(int parity, int thread, bool from_back, long& first, long& last) {
    return take_half(parity, thread, from_back, 1, first, last);
  }
  // Half of thread `victim`'s unclaimed panels, from the end it does not claim from, if it has at
  // least kMinSteal: fewer stay where they are, in the victim's caches.
  bool steal(int parity, int victim, bool victim_from_back, long& first, long& last);
  static constexpr long kMinSteal = 4;
  // Testing hook: how many times a thread has taken panels of another since the process started.
  static long steals();

 private:
  // Half (at least one) of the thread's unclaimed panels, from the back or the front, if it has at
  // least `min_left`.
  bool take_half(int parity, int thread, bool from_back, long min_left, long& first, long& last);
  struct alignas(64) Range {  // a cache line each: a thread claims from its own
    std::atomic<std::uint64_t> bounds{0};
  };
  static std::uint64_t pack(long first, long last) {
    return static_cast<std::uint64_t>(first) << 32 | static_cast<std::uint64_t>(last);
  }
  std::atomic<std::uint64_t>& slot(int parity, int thread) {
    return ranges_[static_cast<std::size_t>(2 * thread + parity)].bounds;
  }
  std::vector<Range> ranges_;
};

// Below this many multiply-adds in all (about 0.3 ms on one core), a call does not wait for
// workers that sleep (after 2 ms idle): it runs on the calling thread and wakes them for the next
// call. Waking one takes up to 0.5 ms on this project's VM, where the woken worker often starts on
// the caller's own core (in 44-54 of 60 calls 20 ms apart, sched_getcpu) and leaves it at its
// first wait (leave_shared_cpu in thread_pool.cpp). Measured before workers left a shared core: an
// LSTMCell step at H=128, 20 ms after the previous one, took 610-650 us on two threads, 110-130 us
// on one, and 110-150 us on two threads this way. Since, 2^20 here did not make calls of 2^20 to
// 2^24 made 20 ms apart faster (LSTM T100 B1 H128 inference 0.81-0.91 ms, against 0.79-0.87).
constexpr long kShortCallWork = 1L << 24;
class ThreadPool {
 public:
  // The threads a region uses unless told otherwise: FASTRNN_NUM_THREADS, or else the cores this
  // process may run on (CPU affinity and cgroup quota).
  static int default_threads();
  static ThreadPool& global();
  // The most threads FASTRNN_NUM_THREADS and set_num_threads accept: every call waits for every
  // worker to acknowledge it, so thousands of them make every call milliseconds long.
  static constexpr int kMaxThreads = 1024;

  // How many times a worker has left a CPU it shared with another thread of its region (see
  // leave_shared_cpu in thread_pool.cpp).
  static long cpu_moves();

  int threads() const { return threads_.load(); }
  void set_threads(int threads);

  // Runs regions on the thread team of an OpenMP runtime already loaded in the process (the
  // shared library at `library`, e.g. the libgomp torch uses) instead of on the pool's own
  // workers; "" goes back to the own workers. A library that runs OpenMP regions of its own
  // leaves its workers spinning after each one, on the cores fastrnn's workers would need: on its
  // team, fastrnn's regions start on those very threads. Throws std::runtime_error if the library
  // is not loaded or exports no GOMP_parallel (libgomp, and the GNU entry points of libomp and
  // libiomp5, have it).
  void use_openmp(const std::string& library);
  std::string openmp_library() const;

  // Runs body(ctx) on min(threads, this->threads()) threads and returns when all are done. The
  // body must not throw. A call made while the pool is busy (another Python thread, or from
  // inside a region) runs on the calling thread alone: same results, no deadlock.
  template <class Body>
  void run(int threads, Body&& body) {
    run_job(threads, &invoke<std::remove_reference_t<Body>>, &body);
  }

  // Whether a call of `work` should run on the workers: always from `short_work` up (in
  // multiply-adds by default, see kShortCallWork), a shorter one only when they are awake. Workers
  // that sleep are woken for the next call, which finds them spinning.
  bool use_workers(long work, long short_work = kShortCallWork) {
    return work >= short_work || wake();
  }

  // Runs task(i) for every i in [0, count), spread over up to `threads` threads. Unlike a region's
  // body, a task may throw (say, bad_alloc): once all tasks are done, the exception of the first
  // one that failed is rethrown here.
  template <class Task>
  void run_tasks(int threads, int count, Task&& task) {
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(count));
    run(threads, [&](const ThreadContext& ctx) {
      for (int i = ctx.index; i < count; i += ctx.count) {
        try {
          task(i);
        } catch (...) {  // nothing may leave a parallel region
          errors[static_cast<std::size_t>(i)] = std::current_exception();
        }
      }
    });
    for (const std::exception_ptr& error : errors)
      if (error) std::rethrow_exception(error);
  }

  ~ThreadPool();

 private:
  using JobFn = void (*)(void*, const ThreadContext&);
  struct OpenMP;
  template <class Body>
  static void invoke(void* body, const ThreadContext& ctx) {
    (*static_cast<Body*>(body))(ctx);
  }

  ThreadPool();
  void run_job(int threads, JobFn fn, void* body);
  void start_workers(int workers);
  void stop_workers();
  // (Re)starts the workers when their count differs from threads() - 1; whether it did. Needs
  // region_mutex_.
  bool match_workers();
  // Whether the workers are awake, ready to start a job at once. Workers that sleep are woken
  // (or started) without waiting for them.
  bool wake();
  void worker_loop(int index, std::uint64_t seen);
  void publish_job();
  static void after_fork_in_child();
  void run_on_openmp(const OpenMP& openmp, int threads, JobFn fn, void* body);

  std::mutex region_mutex_;  // one region at a time
  std::atomic<int> threads_{1};
  std::atomic<const OpenMP*> openmp_{nullptr};  // never freed: a team may outlive a switch
  std::vector<std::thread> workers_;
  // The job being run: published by bumping job_sequence_.
  JobFn job_fn_ = nullptr;
  void* job_body_ = nullptr;
  int job_threads_ = 1;
  SpinBarrier* job_barrier_ = nullptr;
  std::atomic<std::uint64_t> job_sequence_{0};
  std::atomic<int> workers_busy_{0};
  std::atomic<bool> stopping_{false};
  // Parking: a worker that has spun long enough sleeps on park_cv_; parked_ counts them so that
  // publishing a job takes the mutex only when someone sleeps.
  std::mutex park_mutex_;
  std::condition_variable park_cv_;
  std::atomic<int> parked_{0};
  std::atomic<std::uint64_t> wake_sequence_{0};  // bumped by wake(): parked workers spin again
};

}  // namespace fastrnn
