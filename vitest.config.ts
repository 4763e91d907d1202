// Two projects: fast unit tests (fakes allowed, for edge cases only) and integration tests that
// run real QEMU guests through a real agent. Integration files run one at a time: a TCG guest
// keeps a core busy and the machine has two.
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    projects: [
      { test: { name: 'unit', include: ['test/unit/**/*.test.ts'], testTimeout: 20_000 } },
      {
        test: {
          name: 'integration',
          include: ['test/integration/**/*.test.ts'],
          testTimeout: 300_000,
          hookTimeout: 300_000,
          fileParallelism: false,
          pool: 'forks',
        },
      },
    ],
  },
});
