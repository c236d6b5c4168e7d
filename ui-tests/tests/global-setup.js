/** Stop any embedded pool a previous interrupted run left in the tests' runtime directory. */
const { execFileSync } = require('child_process');
const path = require('path');

module.exports = async () => {
  execFileSync(process.env.PYTHON || 'python', [path.join(__dirname, '..', 'pool_helper.py'), 'stop'], {
    stdio: 'inherit'
  });
};
