// Why this file exists: loads the addon node-gyp built (build/Release), for `import` from ESM
// through createRequire; src/migration/ram-hash.ts is its one user.
module.exports = require('./build/Release/ferry_native.node');
