/* What it added to the total. */
long add(int x);
long total_now(void);
long per_thread_add(void);
long zero(void);
long note(long x);
