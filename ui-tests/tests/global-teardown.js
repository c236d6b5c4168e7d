/** The pool the tests started from the panel is kept alive (keep=True) for users: stop it here. */
const { execFileSync } = require('child_process');
const path = require('path');

module.exports = async () => {
  execFileSync(process.env.PYTHON || 'python', [path.join(__dirname, '..', 'pool_helper.py'), 'stop'], {
    stdio: 'inherit'
  });
};
